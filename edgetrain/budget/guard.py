"""Enforcing a memory budget during training.

What this file holds: `apply_budget_options`, which turns `--device-profile` /
`--memory-budget` into a budget; `check_fits`, the pre-flight check of `edgetrain train`;
`check_runtime_fits`; and `RssWatchdog` with `watchdog_for` / `budget_guard`, which stop a
run cleanly at a step boundary before the process outgrows its budget
(`MemoryBudgetExceeded`).

Device profiles are in `edgetrain.budget.devices`, size parsing in `edgetrain.units`, the
planner in `edgetrain.budget.planner`; predicted bytes come from `edgetrain.budget.estimate`.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
import threading

import psutil
import torch

from edgetrain.budget.devices import load_profile
from edgetrain.budget.estimate import estimate_peak
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.measure import runtime_baseline_bytes
from edgetrain.units import fmt_bytes, parse_size


# --------------------------------------------------------------------------- enforcement
class MemoryBudgetExceeded(UserError):
    """The process outgrew its memory budget; training stopped at a step boundary."""


def check_runtime_fits(budget_bytes: int, baseline_bytes: int) -> None:
    """Raises `UserError` when the budget cannot even hold the runtime itself."""
    if budget_bytes <= baseline_bytes:
        raise UserError(f"memory budget {fmt_bytes(budget_bytes)} is below the runtime itself "
                        f"({fmt_bytes(baseline_bytes)} resident after importing PyTorch)")


def check_fits(cfg: RunConfig, input_shape, num_classes: int, n_train: int | None) -> None:
    """Pre-flight check of `train`: refuse a configuration predicted to exceed its budget
    (runtime baseline plus predicted tensor peak, without the planner's safety factor).

    Does nothing when `cfg.memory_budget` is None.

    Raises:
        UserError: budget below the runtime, or the configuration is predicted not to fit.
    """
    if cfg.memory_budget is None:
        return
    baseline = runtime_baseline_bytes()
    check_runtime_fits(cfg.memory_budget, baseline)
    # no SAFETY factor here: `plan` keeps that margin, and the baseline measured in this
    # process differs by a few MiB from the planner's; refuse only a predicted overrun
    need = baseline + estimate_peak(cfg, tuple(input_shape), num_classes, n_train).peak_bytes
    if need > cfg.memory_budget:
        raise UserError(f"this configuration is predicted to need {fmt_bytes(need)}, more than "
                        f"the memory budget {fmt_bytes(cfg.memory_budget)}; run `edgetrain plan` "
                        "for one that fits")


class RssWatchdog:
    """Polls the process's resident memory in a background thread.

    The thread only records; `check()`, called by the training loop between optimiser
    steps, raises `MemoryBudgetExceeded`, so the run stops at a step boundary where the
    last checkpoint is intact. With `count_cuda`, CUDA memory reserved by PyTorch is added
    (Jetson: GPU memory is system memory but is not in RSS).
    """

    def __init__(self, budget_bytes: int, interval_s: float = 0.05, count_cuda: bool = False):
        self.budget_bytes, self.interval_s, self.count_cuda = budget_bytes, interval_s, count_cuda
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="edgetrain-rss", daemon=True)
        self.peak_bytes = 0
        self.over_bytes: int | None = None  # the first reading above the budget

    def usage_bytes(self) -> int:
        used = self._proc.memory_info().rss
        if self.count_cuda:
            if torch.cuda.is_initialized():
                used += torch.cuda.memory_reserved()
        return used

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._record(self.usage_bytes())
            self._stop.wait(self.interval_s)

    def _record(self, used: int) -> None:
        self.peak_bytes = max(self.peak_bytes, used)
        if used > self.budget_bytes and self.over_bytes is None:
            self.over_bytes = used

    def check(self) -> None:
        """Raise `MemoryBudgetExceeded` if any reading so far exceeded the budget."""
        self._record(self.usage_bytes())
        if self.over_bytes is not None:
            raise MemoryBudgetExceeded(
                f"stopped: resident memory reached {fmt_bytes(self.over_bytes)}, over the "
                f"memory budget of {fmt_bytes(self.budget_bytes)}; the run directory keeps its "
                "last checkpoint (`edgetrain train --resume RUN_DIR` continues it once memory "
                "is freed; `edgetrain plan` finds a configuration that fits)")

    def __enter__(self) -> "RssWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def watchdog_for(cfg: RunConfig, device: str = "cpu") -> RssWatchdog | None:
    """The watchdog for a run with a budget (None without one).

    CUDA memory counts against the budget only on a profile whose CPU and GPU share one
    DRAM (`cfg.shared_cpu_gpu_memory`, set by `--device-profile`).
    """
    if cfg.memory_budget is None:
        return None
    return RssWatchdog(cfg.memory_budget, count_cuda=cfg.shared_cpu_gpu_memory and str(device).startswith("cuda"))


def apply_budget_options(opts: dict, profile_name: str | None, budget_text: str | None,
                         root: Path | None = None) -> dict:
    """Fold `--device-profile` / `--memory-budget` into RunConfig keyword arguments.

    Raises:
        UserError: both given, an unknown or malformed profile, a malformed size.
    """
    if profile_name and budget_text:
        raise UserError("give --device-profile or --memory-budget, not both")
    opts = dict(opts)
    if budget_text:
        opts["memory_budget"] = parse_size(budget_text)
    elif profile_name:
        prof = load_profile(profile_name, root)
        check_accelerator(prof, opts.get("device", "auto"))
        opts["memory_budget"] = prof.budget_bytes
        opts["device_profile"] = prof.name
        opts["shared_cpu_gpu_memory"] = prof.shared_cpu_gpu_memory
    return opts


def check_accelerator(profile, device: str = "auto") -> None:
    """Refuse a CUDA profile where CUDA is missing (unless `--device cpu` asks for the CPU):
    its budget counts GPU memory, and a silent CPU run would not be the device's run."""
    if profile.accelerator == "cuda" and device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"device profile {profile.name} trains on CUDA, which is not available "
                        "on this machine (give --device cpu to run its budget on the CPU anyway)")


@contextmanager
def budget_guard(run):
    """Watch RSS while `run` trains when its config has a budget; `run.step_check` raises.

    `run` is an `edgetrain.regimes.run.Run`; its `step_check` is called between optimiser
    steps, so a stop leaves every checkpoint written so far valid.
    """
    wd = watchdog_for(run.cfg, str(run.device))
    if wd is None:
        yield None
        return
    run.step_check = wd.check
    try:
        with wd:
            yield wd
    finally:
        run.step_check = None
