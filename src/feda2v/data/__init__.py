"""data part (see DESIGN.md)."""
