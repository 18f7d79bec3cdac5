"""Memory budgets: the meta-device simulation, the peak-memory estimator, device profiles,
the planner and the run-time guard."""
