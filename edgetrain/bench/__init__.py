"""Benchmark library code: one module per benchmark, each called by one `edgetrain bench`
subcommand and by a thin script under `benchmarks/`. Results go to `benchmarks/results/`."""
