"""evaluate part (see DESIGN.md)."""
