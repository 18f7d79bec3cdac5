"""The one place that measures memory. Units are in the key names (`_bytes`, `_mib`).

Saved activations are counted through `torch.autograd.graph.saved_tensors_hooks`, each
storage once, parameters excluded.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

MIB = 1024 * 1024


def saved_activation_bytes(fn: Callable[..., Any], *args) -> tuple[int, Any]:
    """Run `fn(*args)` with grad on; return (bytes saved for backward, fn's result).

    Each storage is counted once (views of one tensor are not double counted) and
    parameters (leaf tensors requiring grad) are left out.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad):
            return t
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out
