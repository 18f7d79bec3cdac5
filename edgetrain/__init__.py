"""edgetrain: module-wise (TRGL) training for devices that cannot hold end-to-end backprop.

The public surface is small: `RunConfig` describes a run, `train(cfg)` executes it and
returns its metrics, `evaluate_run(run_dir)` re-evaluates a finished run.
"""
__version__ = "0.1.0"

from edgetrain.errors import UserError  # noqa: E402,F401
