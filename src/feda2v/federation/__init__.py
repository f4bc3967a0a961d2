"""federation part (see DESIGN.md)."""
