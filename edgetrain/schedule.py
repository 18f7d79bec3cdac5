"""The scheduler: builds a run from its config and drives the regimes through `fit_module`.

Order of work: e2e trains the whole network as one stage with the last head; parallel
trains all stages on every batch; sequential and multilap visit the modules one after
the other (R laps of epochs/R epochs for multilap), each fed by the frozen prefix.
This file owns the run directory layout of DESIGN.md (config.json, metrics.json,
modules/NN.safetensors); it does not parse argv.
"""
from __future__ import annotations

import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgetrain import __version__
from edgetrain.config import RunConfig
from edgetrain.data import DataSplits, load_splits
from edgetrain.budget import budget_guard, check_fits
from edgetrain.errors import UserError
from edgetrain.memory import PhaseRecorder
from edgetrain.models import create_model
from edgetrain.models.base import Network
from edgetrain.split import Stage, build_stages, init_orthogonal, make_bounds
from edgetrain.store import atomic_write_json, load_module, save_module
from edgetrain.train import (NonFiniteLoss, PrefixSource, RawSource, Trainer, evaluate_chain,
                             fit_module, make_trainer)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything built from a config: data, network, its stages and the device."""

    cfg: RunConfig
    data: DataSplits
    net: Network
    bounds: list[int]
    stages: list[Stage]
    device: torch.device
    step_check: Callable[[], None] | None = None  # called after every optimiser step (budget watchdog)
    memory: PhaseRecorder | None = None  # per-phase peaks (`with run.memory.phase("cache_write")`)
    checkpoint: object | None = None  # e2e/parallel epoch checkpoints (`edgetrain.checkpoint`)

    @property
    def n_modules(self) -> int:
        return len(self.stages)

    def raw(self, split: str, train: bool = False) -> RawSource:
        return RawSource(self.data, getattr(self.data, split), self.cfg.batch_size, self.device,
                         train=train, augment=self.cfg.augment, seed=self.cfg.seed)


def load_data(cfg: RunConfig) -> DataSplits:
    return load_splits(cfg.data, train_size=cfg.train_size, val_fraction=cfg.val_fraction,
                       test_size=cfg.test_size, seed=cfg.seed, input_shape=cfg.input_shape,
                       synthetic_size=cfg.synthetic_size)


def build_run(cfg: RunConfig, data: DataSplits | None = None,
              device: torch.device | None = None) -> Run:
    """Deterministically (from cfg.seed) build data, network, split and heads."""
    device = device or resolve_device(cfg.device)
    data = data or load_data(cfg)
    seed_everything(cfg.seed)
    net = create_model(cfg.model, data.input_shape, data.num_classes, cfg.width, cfg.depth)
    sample = data.normalize(data.train.x[: min(8, len(data.train))])
    if cfg.mode == "e2e":
        bounds = [0, len(net.blocks)]
    else:
        bounds = make_bounds(net, cfg.modules, cfg.split, sample)
    stages = build_stages(net, bounds, cfg.head, data.num_classes, sample)
    if cfg.init_gain is not None:
        for st in stages:
            init_orthogonal(st, cfg.init_gain)
    for st in stages:
        st.to(device)
    return Run(cfg, data, net, bounds, stages, device)


def prepare_out_dir(out: Path) -> Path:
    """Create a fresh, writable run directory (refusing to overwrite another run)."""
    out = Path(out)
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a run; choose another --out (or --resume it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return out


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return nullcontext(None)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def _fit(run: Run, trainers: list[Trainer], source, epochs: int, first_epoch: int, salt: int,
         desc: str, progress: bool, on_epoch_end=None) -> None:
    with _progress(epochs * source.steps_per_epoch(), desc, progress) as bar:
        def on_step(stats):
            if bar is not None:
                bar.update(1)
            if run.step_check is not None:
                run.step_check()  # raises between steps, where checkpoints are intact
        try:
            fit_module(trainers, source, epochs, first_epoch=first_epoch, salt=salt,
                       label_smoothing=run.cfg.label_smoothing,
                       scaling=run.cfg.transport_scaling, on_step=on_step,
                       on_epoch_end=on_epoch_end)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"{desc}: {e}; the last saved modules are kept") from None


def train_e2e(run: Run, progress: bool) -> list[Trainer]:
    whole = Stage(list(run.net.blocks), run.stages[-1].head, stem=run.net.stem).to(run.device)
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
    """All epochs of e2e / parallel, from the last checkpoint when `run.checkpoint` is set."""
    ck = run.checkpoint
    first = ck.begin(trainers) if ck is not None else 0
    save = (lambda e, _summary: ck.save(trainers, e + 1)) if ck is not None else None
    _fit(run, trainers, src, run.cfg.epochs - first, first, 0, desc, progress, on_epoch_end=save)


def train_sequential(run: Run, progress: bool) -> list[Trainer]:
    """Sequential (one lap) and multilap, every module resident (the in-memory path)."""
    cfg, K = run.cfg, run.n_modules
    raw = run.raw("train", train=True)
    total = cfg.epochs * raw.steps_per_epoch()
    trainers = [make_trainer(st, cfg, k, K, total) for k, st in enumerate(run.stages)]
    for lap in range(cfg.n_laps):
        for k in range(K):
            src = raw if k == 0 else PrefixSource(raw, run.stages[:k])
            desc = f"lap {lap + 1}/{cfg.n_laps} module {k + 1}/{K}"
            _fit(run, [trainers[k]], src, cfg.epochs_per_lap, lap * cfg.epochs_per_lap, k,
                 desc, progress)
    return trainers


def out_of_core(cfg: RunConfig) -> bool:
    """Sequential / multilap runs go through the module store and the activation cache,
    unless `cfg.extra["in_memory"]` asks for the in-memory `PrefixSource` path (the
    baseline of `edgetrain bench speed` and of the cache-equivalence test)."""
    return cfg.mode in ("sequential", "multilap") and not cfg.extra.get("in_memory", False)


def train_stored(run: Run, out: Path, progress: bool, state: dict | None = None) -> dict:
    """Out-of-core sequential / multilap training (one module resident), fresh or resumed;
    writes and returns metrics.json. See `edgetrain.sequential`."""
    from edgetrain.sequential import train_out_of_core
    run.memory = run.memory or PhaseRecorder(run.device)
    with budget_guard(run), run.memory.phase("train"):
        summaries, resident, seconds = train_out_of_core(run, out, progress, state)
    evals = [{k: s[k] for k in ("val_acc", "val_loss", "test_acc", "test_loss")} for s in summaries]
    metrics = build_metrics(run, summaries, evals, seconds)
    metrics["max_resident_modules"] = resident
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def resume(run_dir: Path, progress: bool = False) -> dict:
    """Continue an interrupted sequential / multilap run from its last checkpoint.

    Raises:
        UserError: no run there, another edgetrain version, a changed config.json, a run
            that is not resumable (distributed, in-memory sequential), or any error of `train`.
    """
    from edgetrain.sequential import check_config, read_state
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"no run to resume in {run_dir} (no config.json)")
    cfg = RunConfig.load(run_dir / "config.json")
    state = read_state(run_dir)
    if state is not None:
        check_config(state, cfg, run_dir)
    if (run_dir / "metrics.json").is_file() and (state is None or state.get("finished")):
        import json
        return json.loads((run_dir / "metrics.json").read_text())
    if state is not None and state.get("finished"):
        raise UserError(f"{run_dir} finished training but its metrics.json is missing; "
                        f"`edgetrain eval {run_dir}` re-evaluates it")
    if cfg.distributed or (cfg.mode == "sequential" or cfg.mode == "multilap") and not out_of_core(cfg):
        raise UserError(f"{run_dir} is a distributed or in-memory run; it does not checkpoint "
                        "and cannot be resumed")
    if not out_of_core(cfg):
        return train_resident(build_run(cfg), run_dir, progress, state)
    return train_stored(build_run(cfg), run_dir, progress, state)


def _module_record(tr) -> dict:
    """history, tau, step and blocks of a Trainer, or of an out-of-core summary dict."""
    if isinstance(tr, dict):
        return tr
    return {"history": tr.history, "tau": tr.weighting.effective_tau, "step": tr.step,
            "blocks": len(tr.stage.blocks)}


REGIMES = {"e2e": train_e2e, "parallel": train_parallel, "sequential": train_sequential,
           "multilap": train_sequential}


def evaluate(run: Run) -> list[dict]:
    """Validation and test accuracy of every prefix F_k o G_k."""
    val = evaluate_chain(run.stages, run.raw("val").epoch())
    test = evaluate_chain(run.stages, run.raw("test").epoch())
    return [{"val_acc": v["acc"], "val_loss": v["loss"], "test_acc": t["acc"],
             "test_loss": t["loss"]} for v, t in zip(val, test)]


def best_depth(per_module: list[dict]) -> int:
    """1-based depth with the highest validation accuracy (the shallowest on ties)."""
    accs = [m["val_acc"] for m in per_module]
    return accs.index(max(accs)) + 1


def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_metrics(run: Run, trainers: list[Trainer], evals: list[dict], seconds: float) -> dict:
    modules = []
    for k, (tr, ev) in enumerate(zip(trainers, evals)):
        rec = _module_record(tr)
        last = rec["history"][-1] if rec["history"] else {}
        modules.append({"index": k, **ev, "train_loss": last.get("train_loss"),
                        "transport": last.get("transport"),
                        "tau": rec["tau"], "epochs": len(rec["history"]),
                        "steps": rec["step"], "blocks": rec["blocks"]})
    bd = best_depth(modules)
    return {"edgetrain_version": __version__, "mode": run.cfg.mode, "modules": modules,
            "n_modules": len(modules), "bounds": run.bounds, "best_depth": bd,
            "best_val_acc": modules[bd - 1]["val_acc"], "best_test_acc": modules[bd - 1]["test_acc"],
            "last_test_acc": modules[-1]["test_acc"],
            "max_resident_modules": len(run.stages),
            "peak_rss_mib": run.memory.peak_rss_mib() if run.memory else peak_rss_mib(),
            "memory": run.memory.metrics() if run.memory else {}, "timings": {"train_s": seconds},
            "device": str(run.device)}


def train(cfg: RunConfig, out_dir: Path, progress: bool = False, launch=None) -> dict | None:
    """Train a run as configured and write its run directory; returns the metrics.

    Raises:
        UserError: bad configuration, unwritable output, non-finite loss.

    With `cfg.distributed` this process is one rank (`launch`, an `edgetrain.distributed.Launch`)
    of a torchrun launch; it returns the metrics on rank 0 and None on the other ranks.
    """
    if cfg.distributed:
        from edgetrain.distributed import train_distributed
        return train_distributed(cfg, out_dir, launch, progress)
    data = load_data(cfg)
    check_fits(cfg, data.input_shape, data.num_classes, len(data.train))  # before the model exists
    run = build_run(cfg, data=data)  # every configuration error surfaces before the run dir exists
    out = prepare_out_dir(out_dir)
    cfg.save(out / "config.json")
    run.memory = PhaseRecorder(run.device)
    if out_of_core(cfg):
        return train_stored(run, out, progress)
    if cfg.mode in ("e2e", "parallel"):
        return train_resident(run, out, progress)
    t0 = time.perf_counter()
    with budget_guard(run), run.memory.phase("train"):  # RSS watchdog when cfg.memory_budget is set
        trainers = REGIMES[cfg.mode](run, progress)
    return _finish(run, out, trainers, time.perf_counter() - t0)


def train_resident(run: Run, out: Path, progress: bool, state: dict | None = None) -> dict:
    """e2e / parallel training with epoch checkpoints, fresh or resumed from `state`."""
    from edgetrain.checkpoint import ResidentCheckpoint
    run.memory = run.memory or PhaseRecorder(run.device)
    run.checkpoint = ResidentCheckpoint(run, out, state)
    with budget_guard(run), run.memory.phase("train"):  # RSS watchdog when cfg.memory_budget is set
        trainers = REGIMES[run.cfg.mode](run, progress)
    # the last checkpoint stays whole until state.json says finished, so a kill in between
    # resumes to the same metrics; then the optimizer state leaves the module files
    metrics = _finish(run, out, trainers, run.checkpoint.seconds(), save=False)
    run.checkpoint.finish()
    for k in range(len(trainers)):
        run.checkpoint.store.strip(k)
    return metrics


def _finish(run: Run, out: Path, trainers: list[Trainer], seconds: float, save: bool = True
            ) -> dict:
    """Write the final module files (weights only) if `save`, evaluate, write metrics.json."""
    for k, st in enumerate(run.stages if save else []):
        save_module(out, k, st, {"edgetrain_version": __version__, "index": k})
    with run.memory.phase("eval"):
        evals = evaluate(run)
    metrics = build_metrics(run, trainers, evals, seconds)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def load_run(run_dir: Path, device: torch.device | None = None) -> Run:
    """Rebuild a finished run from its config.json and module files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no run directory {run_dir}")
    cfg = RunConfig.load(run_dir / "config.json")
    run = build_run(cfg, device=device)
    if cfg.mode == "e2e":
        run.stages = [Stage(list(run.net.blocks), run.stages[-1].head, stem=run.net.stem)]
    for k, st in enumerate(run.stages):
        load_module(run_dir, k, st)
    return run


def evaluate_run(run_dir: Path) -> dict:
    """Re-evaluate every depth of a finished run; returns per-module accuracies and best depth."""
    run = load_run(run_dir)
    evals = evaluate(run)
    for k, e in enumerate(evals):
        e["index"] = k
    return {"modules": evals, "best_depth": best_depth(evals)}


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data}-{cfg.model}-{cfg.mode}-{stamp}-{os.getpid()}"
