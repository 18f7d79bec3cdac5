"""edgetrain: module-wise (TRGL) training for devices that cannot hold end-to-end backprop.

The public surface is small: `RunConfig` describes a run, `train(cfg)` executes it and
returns its metrics, `evaluate_run(run_dir)` re-evaluates a finished run, and
`wrap(model, blocks=[...])` turns a user's own nn.Module into a trainable Network.
"""
__version__ = "0.1.0"

from edgetrain.errors import UserError  # noqa: E402,F401


def __getattr__(name: str):
    """Lazy exports, so that `import edgetrain` (and the CLI's --help) does not import torch."""
    if name == "wrap":
        from edgetrain.wrap import wrap
        return wrap
    raise AttributeError(f"module 'edgetrain' has no attribute {name!r}")
