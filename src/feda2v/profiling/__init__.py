"""profiling part (see DESIGN.md)."""
