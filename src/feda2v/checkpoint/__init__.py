"""checkpoint part (see DESIGN.md)."""
