"""Thin entry points: compose config, call the parts, turn user errors into one line."""
