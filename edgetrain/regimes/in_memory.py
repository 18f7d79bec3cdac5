"""Sequential and multi-lap training with every module resident: the in-memory path.

Module k trains on the output of the frozen modules before it, recomputed on the fly
(`PrefixSource`, eval mode, no_grad) instead of read from the activation cache: the
recompute baseline of `edgetrain bench speed` and of the cache-equivalence test
(`RunConfig.in_memory`). It does not checkpoint, so it cannot be resumed. The out-of-core
path with one module resident is `edgetrain.regimes.out_of_core`.
"""
from __future__ import annotations

from pathlib import Path
import time

from edgetrain.budget.guard import budget_guard
from edgetrain.method.loop import Interrupted, PrefixSource, Trainer, make_trainer, train_epochs
from edgetrain.regimes.resident import finish, named_nonfinite
from edgetrain.regimes.run import Run, stopped
from edgetrain.storage.runlog import epoch_logger


def train_in_memory(run: Run, out: Path, progress: bool) -> dict:
    """Sequential / multilap with every module resident; writes and returns metrics.json."""
    t0 = time.perf_counter()
    with budget_guard(run), run.memory.phase("train"):  # RSS watchdog when cfg.memory_budget is set
        trainers = train_sequential(run, progress)
    return finish(run, out, trainers, time.perf_counter() - t0)


def train_sequential(run: Run, progress: bool) -> list[Trainer]:
    """Every lap, every module in turn for `epochs_per_lap` epochs on its prefix's output."""
    cfg, K = run.cfg, run.n_modules
    raw = run.raw("train", train=True)
    total = cfg.epochs * raw.steps_per_epoch()
    trainers = [make_trainer(st, cfg, k, K, total) for k, st in enumerate(run.stages)]
    for lap in range(cfg.n_laps):
        for k in range(K):
            src = raw if k == 0 else PrefixSource(raw, run.stages[:k], cfg.precision)
            desc = f"lap {lap + 1}/{cfg.n_laps} module {k + 1}/{K}"
            try:
                with named_nonfinite(desc):
                    train_epochs([trainers[k]], src, cfg.epochs_per_lap, cfg,
                                 first_epoch=lap * cfg.epochs_per_lap, salt=k, desc=desc,
                                 progress=progress, step_check=run.step_check,
                                 on_epoch_end=epoch_logger(run.log, k, lap), stop=run.stop)
            except Interrupted as it:
                raise stopped(run, None, f"in {desc} after batch {it.position}",
                              resumable=False) from None
    return trainers
