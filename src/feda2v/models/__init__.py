"""models part (see DESIGN.md)."""
