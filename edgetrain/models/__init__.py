"""Model registry: every network is a stem plus a list of blocks returning (out, residue).

`create_model(name, in_shape, num_classes, width=..., depth=...)` builds one;
`list_models()` names them. The registry is written only by `@register_model`.
"""
from __future__ import annotations

from edgetrain.models.base import Network
from edgetrain.registry import Registry

_MODELS = Registry("model")


def register_model(name: str):
    """Decorator: register `fn(in_shape, num_classes, width=None, depth=None) -> Network`."""
    return _MODELS.register(name)


def list_models() -> list[str]:
    return _MODELS.names()


def create_model(name: str, in_shape: tuple[int, int, int], num_classes: int,
                 width: int | None = None, depth: int | None = None) -> Network:
    """Build a registered network for inputs of shape `in_shape` (C, H, W).

    Raises:
        UserError: unknown name, or a width/depth the model cannot take.
    """
    return _MODELS.lookup(name)(tuple(in_shape), num_classes, width=width, depth=depth)


# populate the registry
from edgetrain.models import resnet, swin, tv_resnet, vgg, vit  # noqa: E402,F401
