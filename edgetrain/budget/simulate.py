"""Tensor-level simulation of a run's phases on the meta device: the predictor's engine.

The predictor (`edgetrain.budget.estimate.estimate_peak`) does not guess which tensors a training step
holds at its peak: it runs the product's own step (`edgetrain.method.loop.stage_loss`, `zero_grad`,
`backward`, `opt.step`, twice, so the optimizer state exists), evaluation and cache-write
forwards on meta tensors (shapes only, nothing computed, nothing allocated) under
`LiveBytes`, a dispatch mode that adds up the bytes of every storage alive after each
operator and keeps the maximum. Parameters, buffers, gradients, optimizer state, saved
activations, backward temporaries and the input batch are all storages, so their sum at
the worst moment is what the allocator must provide; what lives outside tensors (the
runtime, the data set, the cache reader's queue, the cache writer's shard buffer) is
added by the predictor.

`step_flops` runs the same step under PyTorch's FLOP counter instead: the planner's estimate of
what `--recompute` costs in time (`edgetrain.budget.estimate.recompute_time_ratio`).

`tests/budget/test_simulate.py` checks that the simulated peak of a step equals the peak tracked
by the same mode around the real `train.train_step` on CPU tensors.

Precision (`--precision bf16|fp16`): `torch.autocast` does nothing to meta tensors, so the
forwards here run under `edgetrain.method.precision.autocast(precision, "meta")`, which makes
CPU autocast's casts itself: conv / linear / matmul outputs and what follows them are 2-byte
tensors, parameters, gradients and optimizer state stay float32 (`tests/method/test_precision.py`
checks the simulated bf16 step against the real one under CPU autocast).
"""
from __future__ import annotations

from typing import Iterable
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from edgetrain.method.loop import stage_loss
from edgetrain.method.precision import autocast, compute_input


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def kernel_workspace_bytes(func, args, out) -> int:
    """Bytes a CPU kernel holds outside any tensor while it runs (so no dispatch mode sees
    them) on top of the tensors it returns; 0 for an operator without such memory.

    Measured for oneDNN convolutions (torch 2.14.1, x86_64, one and two threads; RSS around
    one call with big allocations unmapped on free, 3x3 and 1x1 kernels, stride 1 and 2,
    16 to 32 channels at 64x96x96): the forward holds max(input, output) beyond its output
    (a reordered copy), the backward input + grad_output beyond its gradients (stride-2
    backward measured 2 x input, 18 MiB more than this at 64x16x96x96). Elsewhere (CUDA) the
    estimator turns this off.
    """
    if func is torch.ops.aten.convolution.default:
        return max(_nbytes(args[0]), _nbytes(out))
    if func is torch.ops.aten.convolution_backward.default:
        return _nbytes(args[0]) + _nbytes(args[1])
    return 0


def on_cpu(cfg) -> bool:
    """Whether cfg's run trains on the CPU (`--device cpu`, or `auto` without CUDA): where
    `kernel_workspace_bytes` applies."""
    device = getattr(cfg, "device", "cpu")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak, while the mode is active.

    A storage counts from the operator that returned it (or from `register`) until the
    last tensor or view using it is freed; views and in-place results add nothing. With
    `workspace` (the default; CPU), an operator's memory outside tensors
    (`kernel_workspace_bytes`) counts toward the peak while that operator runs.
    """

    def __init__(self, workspace: bool = True):
        super().__init__()
        self.now = 0
        self.peak = 0
        self.workspace = workspace
        self._refs: dict[int, weakref.ref] = {}

    def _transient(self, n: int, name: str) -> None:
        """`n` bytes held for a moment above what is alive (a kernel's workspace)."""
        if self.now + n > self.peak:
            self.peak = self.now + n

    def _free(self, key: int, n: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.now -= n

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._refs:
            return
        n = st.nbytes()
        self._refs[key] = weakref.ref(st, lambda _, k=key, n=n: self._free(k, n))
        self.now += n
        self.peak = max(self.peak, self.now)

    def register(self, items: Iterable) -> None:
        """Count tensors created outside the mode (modules: their parameters and buffers)."""
        for item in items:
            if isinstance(item, torch.nn.Module):
                for t in [*item.parameters(), *item.buffers()]:
                    self.track(t)
            elif isinstance(item, torch.Tensor):
                self.track(item)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        if self.workspace:
            n = kernel_workspace_bytes(func, args, out)
            if n:
                self._transient(n, func.__name__)
        return out


class PeakTensors(LiveBytes):
    """`LiveBytes` that also remembers which storages were alive at the peak: the operator
    that made each one (or "parameter", "buffer", "optimizer state", "input"), its shape,
    dtype and bytes. For the floor analysis (`edgetrain.budget.estimate.peak_breakdown`)."""

    def __init__(self, workspace: bool = True):
        super().__init__(workspace)
        self.origin = "input"
        self._meta: dict[int, tuple] = {}
        self.at_peak: list[tuple] = []

    def _free(self, key: int, n: int) -> None:
        super()._free(key, n)
        self._meta.pop(key, None)

    def track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self._refs:
            self._meta[key] = (self.origin, tuple(t.shape), str(t.dtype).replace("torch.", ""),
                               t.untyped_storage().nbytes())
        before = self.peak
        super().track(t)
        if self.peak > before:
            self.at_peak = list(self._meta.values())

    def _transient(self, n: int, name: str) -> None:
        if self.now + n > self.peak:
            self.at_peak = list(self._meta.values()) + [(f"{name} (kernel workspace)", (), "",
                                                         n)]
        super()._transient(n, name)

    def register(self, items: Iterable, origin: str = "parameter") -> None:
        self.origin = origin
        for item in items:
            if isinstance(item, torch.nn.Module):
                self.origin = "parameter"
                for t in item.parameters():
                    self.track(t)
                self.origin = "buffer"
                for t in item.buffers():
                    self.track(t)
            elif isinstance(item, torch.Tensor):
                self.track(item)
        self.origin = "input"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.origin = func.__name__
        return super().__torch_dispatch__(func, types, args, kwargs)


def _batch(shape: tuple, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(batch, *shape, device=device),
            torch.zeros(batch, dtype=torch.long, device=device))


def train_peak(trainers: list, in_shape: tuple, cfg, steps: int = 2, device="meta") -> int:
    """Peak live bytes of `steps` optimizer steps of a chain of trainers (the resident stages
    of the regime: all of them for e2e/parallel, one for sequential/multilap), counting the
    resident stages' parameters and buffers, the input batch and everything the steps make.

    Mirrors `train.train_step` (which also computes statistics that need real values).
    """
    mode = LiveBytes(workspace=on_cpu(cfg))
    return simulate_steps(mode, trainers, in_shape, cfg, steps, device).peak


def simulate_steps(mode: LiveBytes, trainers: list, in_shape: tuple, cfg, steps: int = 2,
                   device="meta") -> LiveBytes:
    """Run `steps` training steps of a chain of trainers under `mode`; returns the mode."""
    with mode:
        mode.register(tr.stage for tr in trainers)
        if isinstance(mode, PeakTensors):
            mode.origin = "optimizer state"
        mode.register(v for tr in trainers for s in tr.opt.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
        _run_steps(trainers, in_shape, cfg, steps, device)
    return mode


def _run_steps(trainers: list, in_shape: tuple, cfg, steps: int, device) -> None:
    """`steps` training steps of a chain of trainers, each on a fresh (empty) batch."""
    for _ in range(steps):
        x, y = _batch(in_shape, cfg.batch_size, device)
        for tr in trainers:
            tr.stage.train()
            total, ce, w, logits, z = stage_loss(tr, x, y, cfg.label_smoothing,
                                                 cfg.transport_scaling, cfg.precision)
            tr.opt.zero_grad(set_to_none=True)
            total.backward()
            tr.opt.step()
            x = z.detach()
            del total, ce, w, logits, z
        del x, y


def step_flops(trainers: list, in_shape: tuple, cfg, device="meta") -> int:
    """FLOPs of one training step of a chain of trainers (forward, backward, and the
    forwards that `--recompute` repeats during backward), counted on the meta device by
    `torch.utils.flop_counter.FlopCounterMode`: matrix products and convolutions only, so
    element-wise work (BatchNorm, ReLU, the transport term) is left out."""
    counter = FlopCounterMode(display=False)
    with counter:
        _run_steps(trainers, in_shape, cfg, 1, device)
    return counter.get_total_flops()


@torch.no_grad()
def eval_peak(stages: list, in_shape: tuple, batch: int, device="meta",
              precision: str = "fp32", workspace: bool = True) -> int:
    """Peak live bytes of evaluating a chain of stages on one batch (`evaluate_chain`): the
    stages' parameters and buffers, the batch, logits and loss of every prefix."""
    mode = LiveBytes(workspace)
    with mode:
        mode.register(stages)
        x, y = _batch(in_shape, batch, device)
        with autocast(precision, device):
            x = compute_input(x, precision)
            for st in stages:
                st.eval()
                x = st.features(x)
                logits = st.head(x)
                loss = F.cross_entropy(logits.float(), y, reduction="sum")
                del logits, loss
        del x, y
    return mode.peak


@torch.no_grad()
def features_peak(stage, in_shape: tuple, batch: int, out_dtype: torch.dtype,
                  device="meta", precision: str = "fp32", workspace: bool = True) -> int:
    """Peak live bytes of one cache-write forward (`Stage.features` in eval mode) and the
    conversion of its output to the cache's storage dtype."""
    mode = LiveBytes(workspace)
    with mode:
        mode.register([stage])
        x, _ = _batch(in_shape, batch, device)
        stage.eval()
        with autocast(precision, device):
            z = stage.features(compute_input(x, precision))
        stored = z.to(out_dtype)
        del x, z, stored
    return mode.peak
