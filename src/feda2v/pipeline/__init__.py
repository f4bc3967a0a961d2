"""Stage jobs that wire the parts together (the side effects around the federation: checkpoint
cadence, tracking, profiling, reports). The CLI entry points call these and nothing else."""
