"""Thin entry points: compose config, call the parts, turn user errors into one line."""
# First, before anything loads numpy or torch: numpy and OpenBLAS read their CPU switches when
# they load, so this is the one place the console scripts can pin them (feda2v/numerics.py).
from feda2v.numerics import pin_environment

pin_environment()
