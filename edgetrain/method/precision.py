"""Mixed precision (`--precision fp32|bf16|fp16`): the one context every forward runs in.

`autocast(precision, device)` is what the training step, the frozen-prefix and cache-writing
passes and evaluation wrap their forwards in: `torch.autocast` in bf16 or fp16 (parameters,
gradients and optimizer state stay float32: fp32 master weights), and a null context for
fp32, which therefore changes nothing. `compute_input` casts a stage's input batch to the
compute dtype, so that a module fed from a float32 source (a cache read, the raw data) runs
its residual stream in the same dtype as one fed the previous module's low-precision output.
Losses are computed in float32 by the callers (logits `.float()`, the transport term in
`edgetrain.method.transport`).

On the `meta` device, where `torch.autocast` does nothing (autocast keys exist for real
backends only), `autocast` returns `MetaAutocast`, which casts the inputs of the operators
CPU autocast runs in low precision, so the memory predictor (`edgetrain.budget.simulate`) sees
the tensors a real step makes. fp16 training on CUDA also needs a `GradScaler` (`make_scaler`).

What this file is not: the place that decides a device's precision (the user, or a device
profile's note, does), nor a check of the config's spelling (`edgetrain.config`).
"""
from __future__ import annotations

from contextlib import nullcontext
import logging

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._pytree import tree_map

from edgetrain.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("edgetrain")

# the operators CPU autocast runs in low precision (torch's autocast_mode.cpp, lower-precision
# list), as they reach `__torch_function__`
_LOW_PRECISION_OPS = frozenset({
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.linear, F.prelu, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm,
    torch.addmm, torch.baddbmm, torch.addbmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
    torch.Tensor.mm, torch.Tensor.bmm})


class MetaAutocast(TorchFunctionMode):
    """CPU autocast's casts, on any device (for meta tensors, which autocast ignores).

    Float32 inputs of the operators in `_LOW_PRECISION_OPS` are cast to `dtype`; casts of
    parameters (leaves that require grad) are cached until the context exits, as autocast
    caches them (unless `cache` is False). The casts happen above autograd, so the tensors
    saved for backward are the low-precision copies, as under `torch.autocast`.
    """

    def __init__(self, dtype: torch.dtype, cache: bool = True):
        super().__init__()
        self.dtype, self.cache = dtype, cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cast(self, t):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return t
        if self.cache and t.is_leaf and t.requires_grad:
            if id(t) not in self._cache:  # the source is kept too, so its id stays unique
                self._cache[id(t)] = (t, t.to(self.dtype))
            return self._cache[id(t)][1]
        return t.to(self.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW_PRECISION_OPS:
            args, kwargs = tree_map(self._cast, (args, kwargs))
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        self._cache.clear()
        return super().__exit__(*exc)


def checkpoint_contexts():
    """`context_fn` of `torch.utils.checkpoint`: (forward, recomputation) contexts. torch
    restores a real autocast for the recomputation itself, not a `MetaAutocast` (a mode of
    the forward's thread; the recomputation may run on the backward thread), so a forward
    under one is recomputed under a fresh one (no cache: nothing outlives the segment)."""
    dtype = next((m.dtype for m in reversed(_get_current_function_mode_stack())
                  if isinstance(m, MetaAutocast)), None)
    return nullcontext(), (nullcontext() if dtype is None else MetaAutocast(dtype, cache=False))


def autocast(precision: str, device: torch.device | str):
    """The context a forward runs in under `precision` on `device` (a null context for fp32).

    Args:
        precision: fp32, bf16 or fp16 (`RunConfig.precision`).
        device: where the forward runs; `meta` gets `MetaAutocast` (the memory predictor).
    """
    if precision == "fp32":
        return nullcontext()
    kind = torch.device(device).type
    if kind == "meta":
        return MetaAutocast(DTYPES[precision])
    return torch.autocast(kind, dtype=DTYPES[precision])


def compute_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    """`x` in the compute dtype of `precision` (unchanged for fp32 and non-float tensors)."""
    if precision == "fp32" or not x.is_floating_point():
        return x
    return x.to(DTYPES[precision])


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast works on `device`: on CUDA the GPU says so; on CPU a tiny conv
    under autocast must come out in bfloat16 (some CPUs or builds cannot)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = F.conv2d(torch.ones(1, 1, 4, 4, device=device),
                         torch.ones(1, 1, 3, 3, device=device))
        return y.dtype == torch.bfloat16
    except (RuntimeError, ValueError):
        return False


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 convolutions run on native kernels: on a CPU without oneDNN's bf16 support
    (no AVX-512 BF16 / AMX) PyTorch falls back to its slow reference convolution."""
    if torch.device(device).type != "cpu":
        return True
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision `device` cannot train in (before any run directory exists).

    Raises:
        UserError: fp16 off CUDA, or bf16 where autocast cannot produce bfloat16.
    """
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device; on CPU use bf16")
    if precision == "bf16" and not bf16_supported(device):
        raise UserError(f"--precision bf16 is not supported on {device.type} by this machine or "
                        "PyTorch build (autocast gave no bfloat16); use --precision fp32")
    if precision == "bf16" and not native_bf16(device):
        log.warning("this CPU has no native bf16 convolutions (oneDNN bf16 unsupported): "
                    "--precision bf16 saves memory but its steps are many times slower")


def runnable_precision(precision: str, device: torch.device) -> str:
    """`precision` if `device` supports it, else fp32: evaluating a finished run elsewhere
    (an fp16 run re-evaluated on a CPU) must not fail."""
    try:
        check_precision(precision, device)
    except UserError:
        return "fp32"
    return precision


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler of one optimizer: fp16 on CUDA needs one (its gradients underflow
    otherwise); bf16 has float32's range and needs none."""
    if precision == "fp16" and torch.device(device).type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
