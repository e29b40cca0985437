"""Backing up: the runner and its phases, the per-guest run state, the copy strategies,
the journal, hooks, the run log, recovery after a crash, and stored run results."""
