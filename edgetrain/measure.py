"""The one place that measures memory. Units are in the key names (`_bytes`, `_mib`).

Three kinds of figure, all reported side by side:
- tensor accounting: parameters, gradients, optimizer state and tensors saved for backward
  (through `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters left out);
- process peak RSS (`VmHWM`, reset per phase through `/proc/self/clear_refs`; `ru_maxrss`
  where `/proc` is missing) and, on CUDA, `max_memory_allocated` / `max_memory_reserved`
  reset per phase (`PhaseRecorder`);
- the runtime's own baseline (`runtime_rss_bytes`), which the predictor of
  `edgetrain.budget.estimate` adds to its tensor peaks.

This file does not run benchmarks (see `edgetrain.bench.memory`) and never reads argv or
the environment.
"""
from __future__ import annotations

from contextlib import contextmanager
import ctypes
import ctypes.util
from dataclasses import dataclass, field
import functools
import math
import os
from pathlib import Path
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Iterable

import torch

from edgetrain.units import MIB

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


# --------------------------------------------------------------------------- tensor accounting
def _storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage, shared by its views; also valid on the meta device
    (where every data pointer is 0)."""
    return t.untyped_storage()._cdata


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def param_bytes(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Bytes of a module's parameters (shared parameters counted once)."""
    return unique_storage_bytes(p for p in module.parameters()
                                if p.requires_grad or not trainable_only)


def buffer_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's buffers (BatchNorm running statistics and the like)."""
    return unique_storage_bytes(module.buffers())


def grad_bytes(module: torch.nn.Module) -> int:
    """Bytes of the gradients currently allocated on a module's parameters."""
    return unique_storage_bytes(p.grad for p in module.parameters() if p.grad is not None)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer keeps in its state (momentum, Adam moments, steps)."""
    return unique_storage_bytes(v for s in opt.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor))


def _saved_storages(fn: Callable[..., Any], *args, exclude: Iterable[torch.Tensor] = ()
                    ) -> tuple[dict[int, int], Any]:
    """Run `fn(*args)` with grad on; return ({storage key: bytes} saved for backward, result)."""
    skip = {_storage_key(t) for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        base = t if t._base is None else t._base  # a parameter's view (W.t()) is a parameter
        if isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad):
            return t
        key = _storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        # detached: packing the tensor itself would tie an output to its own grad_fn, a
        # reference cycle that keeps the whole graph resident until the next gc pass
        return t.detach()

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return seen, out


def saved_activation_bytes(fn: Callable[..., Any], *args,
                           exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """Run `fn(*args)` with grad on; return (bytes saved for backward, fn's result).

    Each storage is counted once (views of one tensor are not double counted) and
    parameters (leaf tensors requiring grad) are left out, as are the storages of
    `exclude` (e.g. the input batch, accounted separately).
    """
    seen, out = _saved_storages(fn, *args, exclude=exclude)
    return sum(seen.values()), out


def account_training_step(model: torch.nn.Module, opt: torch.optim.Optimizer,
                          loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
                          x: torch.Tensor) -> dict:
    """One real optimizer step of `model` on batch `x`, with every tensor class accounted.

    Args:
        model: the module trained.
        opt: its optimizer (its state is allocated by this step if it was empty).
        loss_fn: `loss_fn(model, x) -> scalar loss`.
        x: the input batch (accounted as `input_batch_bytes`, not as an activation).

    Returns:
        dict with params_bytes, grads_bytes, optimizer_bytes, activations_bytes,
        input_batch_bytes and total_bytes.
    """
    act, loss = saved_activation_bytes(lambda: loss_fn(model, x), exclude=[x])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    acc = {"params_bytes": param_bytes(model), "grads_bytes": grad_bytes(model),
           "optimizer_bytes": optimizer_state_bytes(opt), "activations_bytes": act,
           "input_batch_bytes": unique_storage_bytes([x])}
    acc["total_bytes"] = sum(acc.values())
    return acc


# --------------------------------------------------------------------------- process memory
MALLOC_DEFAULT = "auto"  # what the CLI applies when EDGETRAIN_MALLOC is unset


def compact_malloc(threshold_bytes: int = MIB) -> bool:
    """Serve every allocation of `threshold_bytes` or more with its own mmap, so a freed
    tensor goes back to the operating system at once. Returns False outside glibc.

    glibc starts at 128 KiB but raises its mmap threshold each time a mapped block is freed
    (up to 32 MiB on 64-bit): after the first freed feature map, feature maps come from the
    heap, and freed ones stay resident. On a ResNet-110 3x96x96 parallel step that retention
    was 1.3 GiB of a 3.5 GiB peak (benchmarks/results/plan_vs_measured.md). Setting the
    threshold (M_MMAP_THRESHOLD) also turns the dynamic rule off. It also keeps every thread
    on the main heap (M_ARENA_MAX = 1): glibc gives each new thread that allocates (OpenMP
    workers, the cache prefetch thread) an arena reserving 64 MiB of address space; with
    feature maps mmapped, arenas hold only small objects. On a ResNet-110 3x64x64 sequential
    run with 2 threads that was 192 MiB of its 672 MiB peak address space above imports
    (/proc/self/maps at the peak). Process-wide: the CLI and the benchmark children call it
    at start; a library user may call it too.
    """
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-8, 1)  # -8: M_ARENA_MAX
        return bool(libc.mallopt(-3, int(threshold_bytes)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def parse_malloc_policy(spec: str) -> int | None:
    """EDGETRAIN_MALLOC: "system" (glibc untouched: None), "compact" (1 MiB) or "mmap:N"
    (a fixed mmap threshold of N MiB, 0 < N <= 32): the threshold in bytes. ("auto" is
    resolved per job first: `resolve_malloc_policy`.)"""
    if spec == "system":
        return None
    if spec == "compact":
        return MIB
    head, _, n = spec.partition(":")
    try:
        mib = float(n)
    except ValueError:
        mib = -1.0
    if head != "mmap" or not 0 < mib <= 32:  # glibc caps M_MMAP_THRESHOLD at 32 MiB
        raise ValueError(f"EDGETRAIN_MALLOC={spec!r}: use auto, system, compact or mmap:N "
                         "(N MiB, 0 < N <= 32)")
    return int(mib * MIB)


def resolve_malloc_policy(spec: str, budgeted: bool) -> str:
    """EDGETRAIN_MALLOC's "auto" (the CLI's default) for a job: "compact" under a memory budget
    (a device profile, --memory-budget, --fit: the planner's figures assume freed feature maps
    leave the process), else "system" (glibc's default: on a ResNet-110 3x96x96 job compact
    held a third of glibc's peak RSS but took 1.9x the wall time; on the quick start's job
    and `bench speed`'s it saved < 12% for 1.3-1.9x: benchmarks/results/allocator.md)."""
    if spec == "auto":
        return "compact" if budgeted else "system"
    parse_malloc_policy(spec)
    return spec


def apply_malloc_policy(spec: str) -> bool:
    """Apply an EDGETRAIN_MALLOC policy to this process (see `parse_malloc_policy`)."""
    threshold = parse_malloc_policy(spec)
    return False if threshold is None else compact_malloc(threshold)


def usable_cores() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (`cpu.max`, what `docker --cpus` sets) rounded up. torch's default thread count is the
    machine's cores, which oversubscribes a container given fewer."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def default_threads() -> int | None:
    """Set torch's intra-op threads to `usable_cores()` unless the user chose
    (OMP_NUM_THREADS) or torch already uses no more; returns the count set, else None."""
    if os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads() <= usable_cores():
        return None
    torch.set_num_threads(usable_cores())
    return usable_cores()


def _status_kib(key: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size now (VmRSS); 0 where /proc is missing."""
    return (_status_kib("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since start or the last `reset_peak_rss` (VmHWM, else ru_maxrss)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024
    return kib * 1024


def peak_address_space_bytes() -> int:
    """Peak virtual address space (VmPeak): the figure RLIMIT_AS caps; 0 without /proc."""
    return (_status_kib("VmPeak") or 0) * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cuda_on(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


@dataclass
class _Phase:
    name: str
    peak_rss_bytes: int = 0
    cuda_max_allocated_bytes: int = 0
    cuda_max_reserved_bytes: int = 0
    count: int = 0
    seconds: float = 0.0  # wall time inside the phase, nested phases included


@dataclass
class PhaseRecorder:
    """Per-phase peaks of one process: `with rec.phase("train"): ...`.

    A phase's peak excludes the phases nested inside it (the peak counter is read and reset
    when a nested phase starts and ends), so `train` and `cache_write` are told apart even
    though cache writes happen inside training. A phase entered several times keeps its max.
    `overall_peak_rss_bytes` is the process peak across every reset.
    """

    device: torch.device | str | None = None
    phases: dict = field(default_factory=dict)
    overall_peak_rss_bytes: int = 0
    start_rss_bytes: int = field(default_factory=current_rss_bytes)
    _stack: list = field(default_factory=list)
    failed_in: list | None = None  # phase names open (outermost first) when an error left

    def _sample(self) -> None:
        """Fold the counters into the innermost open phase and the overall peak, then reset."""
        rss = peak_rss_bytes()
        self.overall_peak_rss_bytes = max(self.overall_peak_rss_bytes, rss)
        cuda = _cuda_on(self.device)
        if self._stack:
            p = self._stack[-1]
            p.peak_rss_bytes = max(p.peak_rss_bytes, rss)
            if cuda:
                p.cuda_max_allocated_bytes = max(p.cuda_max_allocated_bytes,
                                                 torch.cuda.max_memory_allocated(self.device))
                p.cuda_max_reserved_bytes = max(p.cuda_max_reserved_bytes,
                                                torch.cuda.max_memory_reserved(self.device))
        reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def phase(self, name: str):
        """Record the peaks of the enclosed code under `name`."""
        self._sample()
        p = self.phases.setdefault(name, _Phase(name))
        self._stack.append(p)
        t0 = time.perf_counter()
        try:
            yield p
        except BaseException:
            if self.failed_in is None:  # the innermost phases an error left (out of memory)
                self.failed_in = [q.name for q in self._stack]
            raise
        finally:
            p.seconds += time.perf_counter() - t0
            self._sample()
            self._stack.pop()
            p.count += 1

    def peak_rss_mib(self) -> float:
        """Process peak RSS so far, across every per-phase reset."""
        return max(self.overall_peak_rss_bytes, peak_rss_bytes()) / MIB

    def metrics(self) -> dict:
        """JSON-ready figures: `{phase: {peak_rss_mib, count, seconds, cuda_max_allocated_mib,
        ...}}` (seconds: this process's wall time in the phase, nested phases included)."""
        out = {}
        for name, p in self.phases.items():
            d = {"peak_rss_mib": p.peak_rss_bytes / MIB, "count": p.count,
                 "seconds": round(p.seconds, 4)}
            if _cuda_on(self.device):
                d["cuda_max_allocated_mib"] = p.cuda_max_allocated_bytes / MIB
                d["cuda_max_reserved_mib"] = p.cuda_max_reserved_bytes / MIB
            out[name] = d
        return out


_RUNTIME_PROBE = """
import torch, edgetrain.measure as m
from edgetrain.config import RunConfig
from edgetrain.regimes.resident import train_e2e
from edgetrain.regimes.run import build_run
m.compact_malloc()
imp = m.peak_rss_bytes()
cfg = RunConfig(data="synthetic", input_shape=(1, 8, 8), synthetic_size=40, model="kmresnet",
                width=4, depth=2, modules=1, mode="e2e", epochs=1, batch_size=8, augment=False)
train_e2e(build_run(cfg), False)
print(imp, m.peak_rss_bytes())
"""


@functools.lru_cache(maxsize=1)
def runtime_rss_bytes() -> dict:
    """Peak RSS of a fresh Python (measured once per process in a subprocess, cached).

    Returns:
        {"import_rss_bytes": after importing torch and edgetrain,
         "warm_rss_bytes": after that plus one training step of a tiny network (the
         allocator, thread pools and kernel code a first step brings in; its tensors are
         a few KiB)}.

    Raises:
        RuntimeError: the measuring subprocess failed.
    """
    res = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE], capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"runtime baseline probe failed: {res.stderr.strip()[-300:]}")
    imp, warm = (int(v) for v in res.stdout.strip().splitlines()[-1].split())
    return {"import_rss_bytes": imp, "warm_rss_bytes": warm}


def runtime_baseline_bytes() -> int:
    """The runtime's own peak RSS: a fresh Python that imported torch and edgetrain and ran
    one tiny training step (see `runtime_rss_bytes`); measured once per process, cached.
    A run's process peak RSS is predicted as this plus `PeakEstimate.peak_bytes`."""
    return runtime_rss_bytes()["warm_rss_bytes"]


def peak_rss_mib() -> float:
    """The process's lifetime peak RSS in MiB (`ru_maxrss`, never reset; `peak_rss_bytes`
    is the resettable per-phase figure)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_mib() -> tuple[int, int]:
    """(total, available) MiB of this machine, or of its cgroup when that is lower."""
    import psutil  # here: a torch-free install (predict MODEL.onnx) has no psutil
    vm = psutil.virtual_memory()
    total, avail = vm.total, vm.available
    try:
        limit = int(Path("/sys/fs/cgroup/memory.max").read_text().strip())
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit < total:
            total, avail = limit, min(avail, limit - used)
    except (OSError, ValueError):
        pass
    return total // MIB, avail // MIB


def memory_headroom_bytes() -> int:
    """What this process may still allocate: the least of its address-space limit
    (RLIMIT_AS) minus its address space (VmSize), and the memory available to it
    (`memory_mib`: the machine's, or its cgroup's when lower)."""
    room = memory_mib()[1] * MIB
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    vm = _status_kib("VmSize")
    if soft != resource.RLIM_INFINITY and vm is not None:
        room = min(room, soft - vm * 1024)
    return room


OOM_MARKS = ("can't allocate memory", "out of memory", "cannot allocate memory",
             "DefaultCPUAllocator")
# oneDNN words every failure to build a kernel so, a failed allocation of its scratchpad
# included; it counts as out of memory only when the process is near its memory's end
ONEDNN_FAILURE = "could not create a primitive"
LOW_HEADROOM = 512 * MIB


def is_out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure: Python's MemoryError, CUDA's OutOfMemoryError, the
    RuntimeError a CPU allocator raises (`[enforce fail at alloc_cpu.cpp] ... can't allocate
    memory`), or oneDNN's `could not create a primitive` with less than LOW_HEADROOM left
    to allocate (`memory_headroom_bytes`; elsewhere that error is a kernel's, not memory's)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e)
    if any(m in text for m in OOM_MARKS):
        return True
    if ONEDNN_FAILURE not in text:
        return False
    try:
        return memory_headroom_bytes() < LOW_HEADROOM
    except MemoryError:  # too little left even to read /proc
        return True
