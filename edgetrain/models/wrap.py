"""`edgetrain.wrap`: turn a user's own `nn.Module` into an edgetrain `Network`.

The user names the blocks, in forward order; the network is their composition
(stem, then block 1, block 2, ...). The model's own `forward` is not called: whatever it
does after the last listed block (pooling, a classifier) is replaced by the auxiliary heads.
Residues follow the paper's Section 2.1:
- a block whose output has the shape of its input gets residue T(x) - x (whether or not
  it is written residually), so it pays a transport cost;
- a block that changes the shape (channels, resolution, tokens) returns residue None and
  carries no transport cost (it still trains through its module's classification loss);
- a block that already follows edgetrain's convention (returns a tuple (out, residue)) is
  used as it is.
To train a wrapped model with `edgetrain train`, register a factory that calls `wrap`
(see docs/method.md, "Models"); this file does not touch the registry.
"""
from __future__ import annotations

import torch
from torch import nn

from edgetrain.errors import UserError
from edgetrain.models.base import AsResidual, Network


def _resolve(model: nn.Module, spec) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        try:
            return model.get_submodule(spec)
        except AttributeError:
            raise UserError(f"wrap: {type(model).__name__} has no submodule {spec!r}") from None
    raise UserError(f"wrap: a block must be a submodule name or an nn.Module (got {type(spec).__name__})")


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return list(model)
    raise UserError(f"wrap: name the blocks of {type(model).__name__} (blocks=[...]); only an "
                    "nn.Sequential is split into its children by default")


def wrap(model: nn.Module, blocks: list | None = None, stem=None,
         in_shape: tuple[int, ...] | None = None) -> Network:
    """Wrap `model` as stem + blocks so edgetrain can split and train it module by module.

    Args:
        model: the user's network; its submodules are shared, not copied.
        blocks: the blocks in forward order, as submodule names (`"layer1.0"`) or modules;
            None splits an `nn.Sequential` into its children.
        stem: a submodule name or module run before the first block (no transport cost,
            always in module 0); None for no stem.
        in_shape: (C, H, W) of one input; when given, a sample is pushed through the blocks
            so that a block that cannot take its predecessor's output fails here, by name.

    Returns:
        A `Network` whose forward is stem, then each block in order.

    Raises:
        UserError: an unknown submodule name, no blocks, or blocks that do not compose.
    """
    specs = _default_blocks(model) if blocks is None else list(blocks)
    if not specs:
        raise UserError("wrap: blocks must name at least one block")
    mods = [_resolve(model, s) for s in specs]
    net = Network(nn.Identity() if stem is None else _resolve(model, stem),
                  [AsResidual(m) for m in mods])
    if in_shape is not None:
        check_composes(net, in_shape, [str(s) if isinstance(s, str) else f"#{i}"
                                       for i, s in enumerate(specs)])
    return net


@torch.no_grad()
def check_composes(net: Network, in_shape: tuple[int, ...], names: list[str]) -> None:
    """Push a 2-sample batch through `net` (eval mode); raise UserError naming a failing block."""
    was = net.training
    net.eval()
    try:
        x = net.stem(torch.zeros(2, *in_shape))
        for name, blk in zip(names, net.blocks):
            try:
                x, _ = blk(x)
            except RuntimeError as e:
                msg = str(e).splitlines()[0]
                raise UserError(f"wrap: block {name} cannot take input of shape "
                                f"{tuple(x.shape[1:])}: {msg}") from None
    finally:
        net.train(was)
