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

`--precision auto` is decided here, in one place: `detect_bf16` says whether a device computes
bf16 natively (x86 with AVX512_BF16 or AMX-BF16, aarch64 with the BF16 extension, each with
oneDNN's bf16 kernels in this PyTorch build; CUDA from sm_80), `choose_precision` turns
`auto` into bf16 there and fp32 elsewhere, and `resolve_precision` writes the choice into a
run's configuration (`precision` resolved, `precision_requested` = "auto").

What this file is not: a check of the config's spelling (`edgetrain.config`).
"""
from __future__ import annotations

from contextlib import nullcontext
import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

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


# the CPU flags (x86 `flags`, aarch64 `Features` in /proc/cpuinfo) of native bf16 arithmetic
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
CPUINFO = Path("/proc/cpuinfo")


class Bf16Check(NamedTuple):
    """Whether a device computes bf16 natively (`native`), and why, in a few words."""

    native: bool
    reason: str


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU feature flags of a /proc/cpuinfo text (x86 `flags`, aarch64 `Features`)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    return frozenset(flags)


def read_cpuinfo(path: Path = CPUINFO) -> str | None:
    """/proc/cpuinfo's text, or None where there is none (macOS, Windows)."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def onednn_bf16() -> bool:
    """oneDNN's own check: this PyTorch build has bf16 kernels for this CPU (it also says yes
    on AVX-512 CPUs without AVX512_BF16, where it emulates bf16: hence the flags too)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return tuple(torch.cuda.get_device_capability(device))


def _cpu_bf16(cpuinfo: str | None, onednn: bool) -> Bf16Check:
    if cpuinfo is None:
        return Bf16Check(False, "no /proc/cpuinfo to read the CPU's flags from")
    have = [f for f in BF16_CPU_FLAGS if f in cpu_flags(cpuinfo)]
    if not have:
        return Bf16Check(False, "this CPU has no bf16 instructions (no avx512_bf16, amx_bf16 "
                                "or bf16 flag in /proc/cpuinfo)")
    if not onednn:
        return Bf16Check(False, f"this CPU has {'+'.join(have)} but this PyTorch build's oneDNN "
                                "has no bf16 kernels for it")
    return Bf16Check(True, f"this CPU has {'+'.join(have)} and oneDNN's bf16 kernels")


def detect_bf16(device: torch.device | str, cpuinfo: str | None = None,
                onednn: bool | None = None, capability: tuple[int, int] | None = None
                ) -> Bf16Check:
    """Whether `device` computes bf16 natively: the one check `--precision auto`, `devices
    calibrate` and the bf16 warning use.

    A CPU needs a bf16 flag in /proc/cpuinfo (x86 AVX512_BF16 or AMX-BF16; aarch64 BF16,
    Armv8.6: Neoverse V1/N2, not a Raspberry Pi's Cortex-A72/A76) and oneDNN's bf16 kernels in
    this PyTorch build; a CUDA device needs compute capability 8.0 or later (Ampere, Jetson
    Orin). Elsewhere bf16 runs on emulation or reference kernels, slower than fp32.

    Args:
        device: the device that will train.
        cpuinfo: a /proc/cpuinfo text (default: this machine's).
        onednn: oneDNN's bf16 check (default: this build's, `onednn_bf16`).
        capability: a CUDA device's (major, minor) (default: `cuda_capability(device)`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = capability or cuda_capability(device)
        ok = (major, minor) >= (8, 0)
        return Bf16Check(ok, f"CUDA sm_{major}{minor} " + (
            "computes bf16 natively" if ok else "has no native bf16 (needs sm_80 or later)"))
    if device.type != "cpu":
        return Bf16Check(False, f"bf16 is not detected on {device.type}")
    return _cpu_bf16(read_cpuinfo() if cpuinfo is None else cpuinfo,
                     onednn_bf16() if onednn is None else onednn)


def choose_precision(requested: str, device: torch.device | str,
                     check: Bf16Check | None = None) -> tuple[str, str]:
    """(precision, why): `requested` itself, or for `auto` bf16 where `device` computes it
    natively (`detect_bf16`, or the given `check`) and fp32 elsewhere."""
    if requested != "auto":
        return requested, "as requested"
    check = check or detect_bf16(device)
    return ("bf16" if check.native else "fp32"), check.reason


def resolve_precision(cfg, device: torch.device | str, check: Bf16Check | None = None):
    """`cfg` (a RunConfig) with `precision: auto` resolved for `device`, and the one line that
    says what was chosen and why (None when the precision was given, and `cfg` unchanged).

    The resolved configuration names the precision it trains in (`bf16` or `fp32`, what
    every reader of config.json expects) and keeps the request in `precision_requested`.
    """
    if cfg.precision != "auto":
        return cfg, None
    precision, why = choose_precision("auto", device, check)
    return (dataclasses.replace(cfg, precision=precision, precision_requested="auto"),
            f"precision   {precision} (auto: {why})")


def memory_format(device: torch.device | str, requested: str = "auto",
                  capability: str | None = None,
                  onednn_avx512: bool | None = None) -> torch.memory_format:
    """The memory format a run's modules train in on `device` (`--memory-format`).

    `auto`: channels-last on a CPU whose kernels are AVX-512 in both ATen
    (`torch.backends.cpu.get_cpu_capability()`, or `capability`) and oneDNN (`onednn_avx512`;
    default: oneDNN's own bf16 check, true from its avx512_core kernels up and false under
    `ONEDNN_MAX_CPU_ISA=AVX2`), the default format elsewhere. `contiguous`: the default format
    everywhere (the same results on every CPU, up to rounding). `channels-last`: asked for.

    Channels-last made a module's CPU step 0.79x-0.85x as long (resnet20 3x32x32, fp32 and
    bf16; kmresnet 1x8x8: 0.83x). On oneDNN's AVX2 kernels (CPUs without AVX-512, or
    ONEDNN_MAX_CPU_ISA=AVX2) torch 2.14.1 corrupts the heap in the weight gradient of a
    channels-last 1x1 stride-2 convolution with 4 input and 8 output channels (pure PyTorch:
    `benchmarks/channels_last_repro_torch.py minimal`), so those CPUs keep the default format;
    so do CUDA devices and other CPUs (not measured) unless asked.

    Raises:
        UserError: channels-last asked for on a CPU whose oneDNN kernels are AVX2.
    """
    device = torch.device(device)
    if requested == "contiguous" or (requested == "auto" and device.type != "cpu"):
        return torch.preserve_format
    avx512 = device.type == "cpu" and \
        (capability or torch.backends.cpu.get_cpu_capability()).startswith("AVX512") and \
        (bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) if onednn_avx512 is None
         else onednn_avx512)
    if requested == "channels-last":
        if device.type == "cpu" and not avx512:
            raise UserError("--memory-format channels-last needs AVX-512 CPU kernels: on "
                            "oneDNN's AVX2 kernels torch 2.14 corrupts the heap with it "
                            "(benchmarks/channels_last_repro_torch.py); use auto or contiguous")
        return torch.channels_last
    return torch.channels_last if avx512 else torch.preserve_format


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
    check = detect_bf16(device) if precision == "bf16" and device.type == "cpu" else None
    if check is not None and not check.native:
        log.warning(f"--precision bf16 without native bf16 ({check.reason}): it saves memory "
                    "but its steps may be many times slower")


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
