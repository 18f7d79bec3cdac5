"""`Registry`: a name -> factory table written only by its decorator (timm's `register_model`).

The model registry (`edgetrain.models`) and the data set registry (`edgetrain.data`) are
both one of these; everything else reads them. `MODEL_NAMES` and `DATASET_NAMES` name the
built-in entries of each, so that `edgetrain train --help` lists the choices without
importing torch (a test checks that they equal the registries once filled).
"""
from __future__ import annotations

from typing import Callable

from edgetrain.errors import UserError

MODEL_NAMES = ("kmresnet", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
               "resnet56", "resnet110", "resnet18", "resnet50", "resnet101", "resnet152",
               "swin_t", "vgg11", "vgg19", "vit")
DATASET_NAMES = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "stl10",
                 "synthetic")


class Registry(dict):
    """Factories by name. `kind` names what it holds in error messages ("model", "dataset")."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable:
        """Decorator: register `fn` under `name`."""
        def deco(fn):
            self[name] = fn
            return fn
        return deco

    def names(self) -> list[str]:
        return sorted(self)

    def lookup(self, name: str) -> Callable:
        """The factory registered as `name`.

        Raises:
            UserError: no such name (the message lists the registered ones).
        """
        if name not in self:
            raise UserError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")
        return self[name]
