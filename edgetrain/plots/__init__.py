"""Pictures of a run directory: per-depth accuracy (`edgetrain eval --plot`) and memory
per phase (`edgetrain status --plot-memory`). Needs the `plots` extra (matplotlib)."""
