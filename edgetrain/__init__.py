"""edgetrain: module-wise (TRGL) training for devices that cannot hold end-to-end backprop.

The public API, documented in docs/reference/api.md, lives here and nowhere else:
- `RunConfig`: describes a run (typed, validated on construction);
- `train(cfg, out_dir)`: trains it, writes the run directory, returns metrics.json's dict;
- `wrap(model, blocks=[...])`: turns a user's own nn.Module into a trainable Network;
- `register_model`: the decorator that adds a network to the model registry;
- `adapt_resnet(model)`: a torchvision ResNet as an edgetrain Network;
- `UserError`: the one exception a user's mistake raises.
Everything else is internal and may move. The names are resolved lazily, so that
`import edgetrain` (and `edgetrain --help`) does not import torch.
"""
__version__ = "0.2.0"

from edgetrain.errors import UserError  # noqa: E402,F401

# public name -> the module that defines it (imported on first access)
_PUBLIC = {
    "RunConfig": "edgetrain.config",
    "train": "edgetrain.regimes.schedule",
    "wrap": "edgetrain.models.wrap",
    "register_model": "edgetrain.models",
    "adapt_resnet": "edgetrain.models.tv_resnet",
}

__all__ = ["UserError", "__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'edgetrain' has no attribute {name!r}")
