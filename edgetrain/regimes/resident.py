"""The resident regimes: every module in memory. End-to-end and parallel, with epoch
checkpoints (`edgetrain.regimes.checkpoint`).

e2e trains the whole network as one stage with the last head; parallel trains all stages on
every batch, each fed the detached output of the one before it. `finish` evaluates every
depth and writes metrics.json (also for `edgetrain.regimes.in_memory`).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from edgetrain import __version__
from edgetrain.budget.guard import budget_guard
from edgetrain.measure import PhaseRecorder
from edgetrain.method.loop import Interrupted, NonFiniteLoss, Trainer, make_trainer, train_epochs
from edgetrain.method.stage import whole_network
from edgetrain.regimes.checkpoint import ResidentCheckpoint
from edgetrain.regimes.run import Run, evaluate, run_metrics, stopped
from edgetrain.storage.atomic import atomic_write_json
from edgetrain.storage.modules import save_module
from edgetrain.storage.runlog import epoch_logger


def e2e_trainers(run: Run) -> tuple[list[Trainer], object]:
    """The whole network as one stage with the last head (it replaces `run.stages`), its
    trainer without transport, and the raw training batches."""
    whole = whole_network(run.net, run.stages[-1].head).to(run.device).set_recompute(run.cfg.recompute)
    run.stages = [whole]
    src = run.raw("train", train=True)
    tr = make_trainer(whole, run.cfg, 0, 1, run.cfg.epochs * src.steps_per_epoch(), transport=False)
    return [tr], src


def parallel_trainers(run: Run) -> tuple[list[Trainer], object]:
    """One trainer per stage (all resident), and the raw training batches."""
    src = run.raw("train", train=True)
    total = run.cfg.epochs * src.steps_per_epoch()
    return [make_trainer(st, run.cfg, k, run.n_modules, total)
            for k, st in enumerate(run.stages)], src


TRAINERS = {"e2e": e2e_trainers, "parallel": parallel_trainers}


def train_e2e(run: Run, progress: bool) -> list[Trainer]:
    """End-to-end training of `run` (with epoch checkpoints when `run.checkpoint` is set)."""
    trainers, src = e2e_trainers(run)
    train_checkpointed(run, trainers, src, "e2e", progress)
    return trainers


def train_parallel(run: Run, progress: bool) -> list[Trainer]:
    """Parallel training of `run` (with epoch checkpoints when `run.checkpoint` is set)."""
    trainers, src = parallel_trainers(run)
    train_checkpointed(run, trainers, src, "parallel", progress)
    return trainers


REGIMES = {"e2e": train_e2e, "parallel": train_parallel}


@contextmanager
def named_nonfinite(desc: str):
    """A non-finite loss names where it happened (`desc`) and what is kept."""
    try:
        yield
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"{desc}: {e}; the last saved modules are kept") from None


def train_resident(run: Run, out: Path, progress: bool, state: dict | None = None) -> dict:
    """e2e / parallel training with epoch checkpoints, fresh or resumed from `state`;
    writes and returns metrics.json."""
    run.memory = run.memory or PhaseRecorder(run.device)
    run.checkpoint = ResidentCheckpoint(run, out, state)
    with budget_guard(run), run.memory.phase("train"):  # RSS watchdog when cfg.memory_budget is set
        trainers, src = TRAINERS[run.cfg.mode](run)
        train_checkpointed(run, trainers, src, run.cfg.mode, progress)
    # the last checkpoint stays whole until state.json says finished, so a kill in between
    # resumes to the same metrics; then the optimizer state leaves the module files
    metrics = finish(run, out, trainers, run.checkpoint.seconds(), save=False)
    run.checkpoint.finish()
    for k in range(len(trainers)):
        run.checkpoint.store.strip(k)
    return metrics


def train_checkpointed(run: Run, trainers: list[Trainer], src, desc: str, progress: bool) -> None:
    """All epochs of e2e / parallel, from the last checkpoint when `run.checkpoint` is set
    (then one after every epoch); a stop request writes a mid-epoch checkpoint and raises
    `Stopped`."""
    ck = run.checkpoint
    first, position, partial = ck.begin(trainers) if ck is not None else (0, 0, None)
    save = (lambda e, _summary: ck.save(trainers, e + 1)) if ck is not None else None
    module = 0 if len(trainers) == 1 else list(range(len(trainers)))
    try:
        with named_nonfinite(desc):
            train_epochs(trainers, src, run.cfg.epochs - first, run.cfg, first_epoch=first,
                         desc=desc, progress=progress, step_check=run.step_check,
                         on_epoch_end=epoch_logger(run.log, module, 0, then=save),
                         skip=position, partial=partial, stop=run.stop)
    except Interrupted as it:
        where = f"in epoch {it.epoch + 1}/{run.cfg.epochs} after batch {it.position}"
        if ck is None:
            raise stopped(run, None, where, resumable=False) from None
        ck.save(trainers, it.epoch, position=it.position, partial=it.partial)
        raise stopped(run, ck.out, where) from None


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
