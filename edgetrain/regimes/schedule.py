"""The dispatcher: train a run, resume it, evaluate it. Nothing else lives here.

Which regime trains a configuration (`regime_of`): e2e and parallel are resident
(`edgetrain.regimes.resident`), sequential and multilap are out of core
(`edgetrain.regimes.out_of_core`) unless asked to stay in memory
(`edgetrain.regimes.in_memory`), and a distributed run is one rank of a torchrun launch
(`edgetrain.regimes.distributed`). The run directory is
`edgetrain.storage.rundir`; this file does not parse argv.
"""
from __future__ import annotations

import json
from pathlib import Path

from edgetrain.budget.guard import check_fits
from edgetrain.budget.oom import out_of_memory_as_user_error
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.measure import PhaseRecorder
from edgetrain.regimes.in_memory import train_in_memory
from edgetrain.regimes.out_of_core import train_out_of_core
from edgetrain.regimes.resident import train_resident
from edgetrain.method.compiled import check_compile
from edgetrain.method.stage import Prefix
from edgetrain.method.precision import check_precision, resolve_precision
from edgetrain.regimes.run import (Run, build_run, confusion, eval_precision, evaluate, load_data,
                                   load_run, per_class_record, resolve_device,
                                   write_preprocessing)
from edgetrain.storage.atomic import atomic_write_json, remove_stale_temps
from edgetrain.storage.cache import check_cache_dir
from edgetrain.storage.lock import lock_run_dir
from edgetrain.storage.rundir import best_depth, check_config, claim_out_dir, read_state
from edgetrain.storage.runlog import LOG, RunLog


def resume(run_dir: Path, progress: bool = False, stop=None, launch=None) -> dict | None:
    """Continue an interrupted run from its last checkpoint (`stop`: as in `train`). A
    distributed run resumes under torchrun: `launch` is this rank's place (rank 0 holds the
    lock and returns the metrics; the other ranks return None).

    An image folder that is gone is read from its pack in the data cache (as `edgetrain eval`).

    Raises:
        UserError: no run there, another edgetrain version, a changed config.json, a run
            that is not resumable (distributed, in-memory sequential), an image folder gone
            with its pack, or any error of `train`.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"no run to resume in {run_dir} (no config.json)")
    if launch is not None:
        cfg = RunConfig.load(run_dir / "config.json")
        if not cfg.distributed:
            raise UserError(f"{run_dir} is not a distributed run: resume it without torchrun")
        from edgetrain.regimes.distributed import train_distributed  # torch.distributed: deferred
        with out_of_memory_as_user_error(cfg, None, run_dir, context="in a distributed rank"):
            return train_distributed(cfg, run_dir, launch, progress, stop=stop, resume=True)
    lock = lock_run_dir(run_dir)  # a live holder is named; a dead one's lock is taken over
    try:
        return _resume(run_dir, progress, stop)
    finally:
        lock.release()


def _resume(run_dir: Path, progress: bool, stop) -> dict:
    for d in (run_dir, run_dir / "modules"):  # a kill inside an atomic write left its temp
        remove_stale_temps(d)
    cfg = RunConfig.load(run_dir / "config.json")
    state = read_state(run_dir)
    if state is not None:
        check_config(state, cfg, run_dir)
    if (run_dir / "metrics.json").is_file() and (state is None or state.get("finished")):
        return json.loads((run_dir / "metrics.json").read_text())
    if state is not None and state.get("finished"):
        raise UserError(f"{run_dir} finished training but its metrics.json is missing; "
                        f"`edgetrain eval {run_dir}` re-evaluates it")
    if cfg.distributed:
        raise UserError(f"{run_dir} is a distributed run: resume it under torchrun with the "
                        "same --nproc_per_node (torchrun ... -m edgetrain.cli train --resume DIR)")
    if cfg.mode in ("sequential", "multilap") and not cfg.out_of_core:
        raise UserError(f"{run_dir} is an in-memory run; it does not checkpoint and cannot be "
                        "resumed")
    check_precision(cfg.precision, resolve_device(cfg.device))
    with out_of_memory_as_user_error(cfg, None, None):  # a gone folder: its pack (as eval)
        run = with_log(build_run(cfg, data=load_data(cfg, gone_folder=True)), run_dir)
    run.stop, run.memory = stop, PhaseRecorder(run.device)
    with out_of_memory_as_user_error(cfg, run.memory, run_dir, run.device):
        return regime_of(cfg)(run, run_dir, progress, state)


def with_log(run: Run, out: Path) -> Run:
    """Give `run` its RUN_DIR/log.jsonl (one line per epoch of every module it trains)."""
    per_module = run.cfg.mode not in ("e2e", "parallel")
    total = run.cfg.epochs * (run.n_modules if per_module else 1)
    run.log = RunLog(Path(out) / LOG, total, len(run.data.train))
    return run


def train(cfg: RunConfig, out_dir: Path, progress: bool = False, launch=None,
          stop=None) -> dict | None:
    """Train a run as configured and write its run directory; returns the metrics.

    `stop`, when given, is checked at every step boundary (`edgetrain.signals.StopSignals`):
    once true, the regime writes a mid-epoch checkpoint and raises `Stopped`.

    Raises:
        UserError: bad configuration, unwritable output, non-finite loss.
        Stopped: a stop request (exit code 128 + signal; the message names `--resume`).

    With `cfg.distributed` this process is one rank (`launch`, an `edgetrain.regimes.distributed.Launch`)
    of a torchrun launch; it returns the metrics on rank 0 and None on the other ranks.
    """
    cfg, _ = resolve_precision(cfg, resolve_device(cfg.device))  # auto: bf16 where native
    check_compile(cfg)  # --compile without a C++ compiler, or with --distributed
    if cfg.distributed:
        from edgetrain.regimes.distributed import train_distributed  # torch.distributed: deferred
        with out_of_memory_as_user_error(cfg, None, Path(out_dir), context="in a distributed rank"):
            return train_distributed(cfg, out_dir, launch, progress, stop=stop)
    check_precision(cfg.precision, resolve_device(cfg.device))  # fp16 off CUDA, bf16 unsupported
    if cfg.cache_dir is not None and cfg.out_of_core:
        check_cache_dir(Path(cfg.cache_dir))
    with out_of_memory_as_user_error(cfg, None, None):
        data = load_data(cfg)
        check_fits(cfg, data.input_shape, data.num_classes, len(data.train))  # before the model
        run = build_run(cfg, data=data)  # every configuration error surfaces before the run dir
    run.stop, run.memory = stop, PhaseRecorder(run.device)
    lock = claim_out_dir(out_dir)
    try:
        with out_of_memory_as_user_error(cfg, run.memory, Path(out_dir), run.device):
            start_run_dir(run, Path(out_dir))
            return regime_of(cfg)(run, Path(out_dir), progress)
    finally:
        lock.release()


def regime_of(cfg: RunConfig):
    """The function that trains `cfg`'s regime: `(run, out, progress[, state]) -> metrics`."""
    if cfg.out_of_core:
        return train_out_of_core
    if cfg.mode in ("e2e", "parallel"):
        return train_resident
    return train_in_memory


def start_run_dir(run: Run, out: Path) -> None:
    """A fresh run directory's config.json, preprocessing and log."""
    run.cfg.save(out / "config.json")
    write_preprocessing(out, run.data)
    with_log(run, out)


def evaluate_run(run_dir: Path) -> dict:
    """Re-evaluate every depth of a finished run; returns per-module accuracies, the best
    depth and, at the best depth, the test split's per-class accuracy and confusion matrix
    (also written into metrics.json as `test_per_class`)."""
    run = load_run(run_dir)
    evals = evaluate(run)
    for k, e in enumerate(evals):
        e["index"] = k
    best = best_depth(evals)
    matrix = confusion(Prefix(run.stages[:best]).eval(), run.raw("test").epoch(),
                       run.data.num_classes, eval_precision(run))
    per_class = per_class_record(matrix, run.data.class_names, best)
    path = Path(run_dir) / "metrics.json"
    if path.is_file():
        metrics = json.loads(path.read_text())
        atomic_write_json(path, {**metrics, "test_per_class": per_class})
    return {"modules": evals, "best_depth": best, "test_per_class": per_class}


