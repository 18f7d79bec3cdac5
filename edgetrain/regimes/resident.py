"""The resident regimes: every module in memory. End-to-end and parallel, with epoch
checkpoints (`edgetrain.regimes.checkpoint`), and the in-memory sequential path.

e2e trains the whole network as one stage with the last head; parallel trains all stages on
every batch, each fed the detached output of the one before it. `finish` evaluates every
depth and writes metrics.json.
"""
from __future__ import annotations

from pathlib import Path
import time

from edgetrain import __version__
from edgetrain.budget.guard import budget_guard
from edgetrain.measure import PhaseRecorder
from edgetrain.method.loop import (Interrupted, NonFiniteLoss, PrefixSource, Trainer, fit,
                                  make_trainer)
from edgetrain.method.stage import whole_network
from edgetrain.regimes.checkpoint import ResidentCheckpoint
from edgetrain.regimes.run import Run, evaluate, run_metrics, stopped
from edgetrain.storage.atomic import atomic_write_json
from edgetrain.storage.modules import save_module
from edgetrain.storage.runlog import epoch_logger


def train_e2e(run: Run, progress: bool) -> list[Trainer]:
    whole = whole_network(run.net, run.stages[-1].head).to(run.device).set_recompute(run.cfg.recompute)
    run.stages = [whole]
    src = run.raw("train", train=True)
    tr = make_trainer(whole, run.cfg, 0, 1, run.cfg.epochs * src.steps_per_epoch(), transport=False)
    _fit_resident(run, [tr], src, "e2e", progress)
    return [tr]


def train_parallel(run: Run, progress: bool) -> list[Trainer]:
    src = run.raw("train", train=True)
    total = run.cfg.epochs * src.steps_per_epoch()
    trainers = [make_trainer(st, run.cfg, k, run.n_modules, total) for k, st in enumerate(run.stages)]
    _fit_resident(run, trainers, src, "parallel", progress)
    return trainers


def _fit_resident(run: Run, trainers: list[Trainer], src, desc: str, progress: bool) -> None:
    """All epochs of e2e / parallel, from the last checkpoint when `run.checkpoint` is set;
    a stop request writes a mid-epoch checkpoint and raises `Stopped`."""
    ck = run.checkpoint
    first, position, partial = ck.begin(trainers) if ck is not None else (0, 0, None)
    save = (lambda e, _summary: ck.save(trainers, e + 1)) if ck is not None else None
    module = 0 if len(trainers) == 1 else list(range(len(trainers)))
    try:
        _fit(run, trainers, src, run.cfg.epochs - first, first, 0, desc, progress,
             on_epoch_end=epoch_logger(run.log, module, 0, then=save), skip=position,
             partial=partial)
    except Interrupted as it:
        where = f"in epoch {it.epoch + 1}/{run.cfg.epochs} after batch {it.position}"
        if ck is None:
            raise stopped(run, None, where, resumable=False) from None
        ck.save(trainers, it.epoch, position=it.position, partial=it.partial)
        raise stopped(run, ck.out, where) from None


def _fit(run: Run, trainers: list[Trainer], source, epochs: int, first_epoch: int, salt: int,
         desc: str, progress: bool, on_epoch_end=None, skip: int = 0, partial=None) -> None:
    try:
        fit(trainers, source, epochs, run.cfg, first_epoch=first_epoch, salt=salt, desc=desc,
            progress=progress, step_check=run.step_check, on_epoch_end=on_epoch_end,
            skip=skip, partial=partial, stop=run.stop)
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"{desc}: {e}; the last saved modules are kept") from None


def train_in_memory(run: Run, out: Path, progress: bool) -> dict:
    """Sequential / multilap with every module resident (`extra["in_memory"]`): the
    recompute baseline of the activation cache. It does not checkpoint."""
    t0 = time.perf_counter()
    with budget_guard(run), run.memory.phase("train"):  # RSS watchdog when cfg.memory_budget is set
        trainers = train_sequential(run, progress)
    return finish(run, out, trainers, time.perf_counter() - t0)


def train_sequential(run: Run, progress: bool) -> list[Trainer]:
    """Sequential (one lap) and multilap, every module resident (the in-memory path)."""
    cfg, K = run.cfg, run.n_modules
    raw = run.raw("train", train=True)
    total = cfg.epochs * raw.steps_per_epoch()
    trainers = [make_trainer(st, cfg, k, K, total) for k, st in enumerate(run.stages)]
    for lap in range(cfg.n_laps):
        for k in range(K):
            src = raw if k == 0 else PrefixSource(raw, run.stages[:k], cfg.precision)
            desc = f"lap {lap + 1}/{cfg.n_laps} module {k + 1}/{K}"
            try:
                _fit(run, [trainers[k]], src, cfg.epochs_per_lap, lap * cfg.epochs_per_lap, k,
                     desc, progress, on_epoch_end=epoch_logger(run.log, k, lap))
            except Interrupted as it:
                raise stopped(run, None, f"in {desc} after batch {it.position}",
                              resumable=False) from None
    return trainers


REGIMES = {"e2e": train_e2e, "parallel": train_parallel}


def train_resident(run: Run, out: Path, progress: bool, state: dict | None = None) -> dict:
    """e2e / parallel training with epoch checkpoints, fresh or resumed from `state`."""
    run.memory = run.memory or PhaseRecorder(run.device)
    run.checkpoint = ResidentCheckpoint(run, out, state)
    with budget_guard(run), run.memory.phase("train"):  # RSS watchdog when cfg.memory_budget is set
        trainers = REGIMES[run.cfg.mode](run, progress)
    # the last checkpoint stays whole until state.json says finished, so a kill in between
    # resumes to the same metrics; then the optimizer state leaves the module files
    metrics = finish(run, out, trainers, run.checkpoint.seconds(), save=False)
    run.checkpoint.finish()
    for k in range(len(trainers)):
        run.checkpoint.store.strip(k)
    return metrics


def finish(run: Run, out: Path, trainers: list[Trainer], seconds: float, save: bool = True
           ) -> dict:
    """Write the final module files (weights only) if `save`, evaluate, write metrics.json."""
    for k, st in enumerate(run.stages if save else []):
        save_module(out, k, st, {"edgetrain_version": __version__, "index": k})
    with run.memory.phase("eval"):
        evals = evaluate(run)
    metrics = run_metrics(run, [tr.record() for tr in trainers], evals, seconds)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
