"""tracking part (see DESIGN.md)."""
