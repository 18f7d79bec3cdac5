"""Model registry: every network is a stem plus a list of blocks returning (out, residue).

`create_model(name, in_shape, num_classes, width=..., depth=...)` builds one;
`list_models()` names them. The registry dict is written only by `@register_model`.
"""
from __future__ import annotations

from typing import Callable

from edgetrain.errors import UserError
from edgetrain.models.base import AsResidual, Network  # noqa: F401

_MODELS: dict[str, Callable[..., Network]] = {}


def register_model(name: str):
    """Decorator: register `fn(in_shape, num_classes, width=None, depth=None) -> Network`."""
    def deco(fn):
        _MODELS[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, in_shape: tuple[int, int, int], num_classes: int,
                 width: int | None = None, depth: int | None = None) -> Network:
    """Build a registered network for inputs of shape `in_shape` (C, H, W).

    Raises:
        UserError: unknown name, or a width/depth the model cannot take.
    """
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(list_models())}")
    return _MODELS[name](tuple(in_shape), num_classes, width=width, depth=depth)


# populate the registry
from edgetrain.models import resnet, swin, tv_resnet, vgg, vit  # noqa: E402,F401
