"""store part (see DESIGN.md)."""
