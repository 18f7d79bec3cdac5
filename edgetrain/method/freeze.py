"""Frozen parts of a network: no parameter gradients, no optimizer state, always eval mode.

`freeze(module)` marks a module (a stem, a block, a head) frozen; `Stage.train` keeps every
marked module in eval mode, so BatchNorm statistics of frozen modules never move while the
rest of the stage trains. Which modules are frozen is decided by the regimes (`--train-modules`).
"""
from __future__ import annotations

from torch import nn

FLAG = "edgetrain_frozen"  # an attribute on the module: survives to("meta"), to_empty, deepcopy


def freeze(module: nn.Module) -> None:
    """No gradients for `module`'s parameters, and eval mode from now on."""
    for p in module.parameters():
        p.requires_grad_(False)
    setattr(module, FLAG, True)
    module.eval()


def is_frozen(module: nn.Module) -> bool:
    return bool(getattr(module, FLAG, False))


def keep_frozen_in_eval(root: nn.Module) -> None:
    """Put every frozen module under `root` back in eval mode (after `root.train()`)."""
    for m in root.modules():
        if is_frozen(m):
            m.train(False)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
