"""The `Run`: everything a configuration builds (data, network, stages, device), and its
evaluation.

`build_run` is deterministic in the config's seed, and raises every configuration error
before anything is written. `load_run` rebuilds a finished run from its directory for eval,
export and inference. `run_metrics` turns a trained run into metrics.json's record.
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
import json
from pathlib import Path
import random
from typing import Callable

import numpy as np
import torch

from edgetrain.config import RunConfig
from edgetrain.data.preprocess import PREPROCESSING, Preprocessing, read_preprocessing
from edgetrain.data.splits import (DataPreview, DataSplits, check_splits, load_splits,
                                   preview_splits)
from edgetrain.errors import Stopped, UserError
from edgetrain.measure import PhaseRecorder, peak_rss_mib
from edgetrain.method.heads import head_spec
from edgetrain.method.loop import RawSource, evaluate_chain
from edgetrain.method.precision import autocast, compute_input, memory_format, runnable_precision
from edgetrain.method.split import build_stages, make_bounds
from edgetrain.method.stage import Stage, init_orthogonal, whole_network
from edgetrain.models import create_model
from edgetrain.models.base import Network
from edgetrain.regimes.finetune import apply_init, freeze_outside
from edgetrain.storage.atomic import atomic_write_json
from edgetrain.storage.modules import load_module, module_path
from edgetrain.storage.rundir import metrics_record, module_entry
from edgetrain.units import MIB


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu` or `cuda` as a torch device (resolved once, here, and passed down)."""
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
    checkpoint: object | None = None  # e2e/parallel epoch checkpoints (`edgetrain.regimes.checkpoint`)
    finetune: dict | None = None  # metrics.json's `init` / `train_modules` (issue #16)
    stop: Callable[[], bool] | None = None  # a stop request (`edgetrain.signals.StopSignals`)
    log: object | None = None  # RUN_DIR/log.jsonl (`edgetrain.storage.runlog.RunLog`)
    memory_format: torch.memory_format = torch.preserve_format  # the modules' (`--memory-format`)

    @property
    def n_modules(self) -> int:
        return len(self.stages)

    def raw(self, split: str, train: bool = False) -> RawSource:
        return RawSource(self.data, getattr(self.data, split), self.cfg.batch_size, self.device,
                         train=train, augment=self.cfg.augment, seed=self.cfg.seed,
                         prefetch_bytes=int(self.cfg.prefetch_mib * MIB))


def stopped(run: Run, out: Path, where: str, resumable: bool = True) -> Stopped:
    """The one-line `Stopped` of a run stopped by a signal after its checkpoint (`where`)."""
    name = getattr(run.stop, "name", "stop requested")
    code = getattr(run.stop, "exit_code", 130)
    if not resumable:
        return Stopped(f"{name}: stopped {where}; this run does not checkpoint", code)
    return Stopped(f"{name}: stopped {where}, checkpoint written; resume with: "
                   f"edgetrain train --resume {out}", code)


def load_data(cfg: RunConfig, gone_folder: bool = False) -> DataSplits:
    """The run's train / val / test splits, as its config describes them (checked usable:
    `edgetrain.data.splits.check_splits`). `gone_folder`: a finished run's image folder that
    no longer exists is read from its pack in the data cache (eval)."""
    data = load_splits(cfg.data, **_data_options(cfg), flip=cfg.flip, gone_folder=gone_folder)
    check_splits(data, cfg.val_fraction)
    return data


def preview_run_data(cfg: RunConfig) -> DataPreview:
    """What `load_data(cfg)` will give (shape, classes, split sizes, checked as usable) and
    the data pack it will write, without writing anything: the planner's view (#21)."""
    data = preview_splits(cfg.data, **_data_options(cfg))
    check_splits(data, cfg.val_fraction)
    return data


def _data_options(cfg: RunConfig) -> dict:
    return dict(train_size=cfg.train_size, val_fraction=cfg.val_fraction,
                test_size=cfg.test_size, seed=cfg.seed, input_shape=cfg.input_shape,
                synthetic_size=cfg.synthetic_size, data_cache=cfg.data_cache,
                image_size=cfg.image_size, channels=cfg.channels,
                skip_bad_images=cfg.skip_bad_images, classes=cfg.classes,
                classes_by=cfg.classes_by)


def build_run(cfg: RunConfig, data: DataSplits | None = None,
              device: torch.device | None = None, init: bool = True) -> Run:
    """Deterministically (from cfg.seed) build data, network, split and heads; then load
    `cfg.init` (unless `init` is False: a finished run's module files replace it) and freeze
    the modules outside `cfg.train_modules`. `cfg.head` is resolved in place (`auto` -> the
    kinds built), so config.json records the heads."""
    device = device or resolve_device(cfg.device)
    data = data or load_data(cfg)
    seed_everything(cfg.seed)
    net = create_model(cfg.model, data.input_shape, data.num_classes, cfg.width, cfg.depth)
    sample = sample_inputs(data)
    bounds = [0, len(net.blocks)]
    if cfg.mode != "e2e" or cfg.train_modules is not None:  # e2e freezes by the K-module split
        module_bounds = make_bounds(net, cfg.modules, cfg.split, sample)
        bounds = bounds if cfg.mode == "e2e" else module_bounds
    stages = build_stages(net, bounds, cfg.head, data.num_classes, sample)
    cfg.head = head_spec([st.head_kind for st in stages])  # config.json records what was built
    finetune, loaded_heads = {}, False
    if cfg.init is not None and init:
        finetune["init"], loaded_heads = apply_init(cfg, net, stages, bounds, data.input_shape,
                                                    data.class_names, source_data_info)
    elif cfg.init_gain is not None:
        for st in stages:
            init_orthogonal(st, cfg.init_gain)
    if cfg.train_modules is not None:
        freeze_outside(cfg, net, stages, module_bounds, loaded_heads)
        finetune["train_modules"] = list(cfg.train_modules)
    fmt = memory_format(device, cfg.memory_format)  # auto: channels-last on AVX-512 CPUs only
    for st in stages:
        st.to(device, memory_format=fmt).set_recompute(cfg.recompute)
    return Run(cfg, data, net, bounds, stages, device, finetune=finetune or None,
               memory_format=fmt)


def source_data_info(run_dir: Path) -> tuple[tuple[int, int, int], list[str]]:
    """(input shape, class names) an edgetrain run was trained on (its data, rebuilt from
    its config.json; an image folder that is gone is read from its pack, as eval does).

    Raises:
        UserError: the run's data cannot be opened (its folder and pack both gone), named
            with `--init RUN_DIR`.
    """
    try:
        data = load_data(RunConfig.load(Path(run_dir) / "config.json"), gone_folder=True)
    except UserError as e:
        raise UserError(f"--init {run_dir}: {e}") from None
    return data.input_shape, data.class_names


def sample_inputs(data: DataSplits | Preprocessing) -> torch.Tensor:
    """Up to 8 normalised training images, which size the split and the heads (only their
    shape matters); zeros of the input shape when only the preprocessing is at hand."""
    if isinstance(data, Preprocessing):
        return torch.zeros(8, *data.input_shape)
    return data.normalize(data.train.rows(torch.arange(min(8, len(data.train)))))


def write_preprocessing(out: Path, data: DataSplits) -> None:
    """RUN_DIR/preprocessing.json: what predict and export need besides the modules."""
    atomic_write_json(Path(out) / PREPROCESSING, data.preprocessing().to_dict())


@torch.no_grad()
def confusion(model: torch.nn.Module, batches, num_classes: int, precision: str = "fp32"
              ) -> torch.Tensor:
    """Confusion matrix (true class, predicted class) of `model` over `batches`."""
    m = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for x, y in batches:
        with autocast(precision, x.device):
            pred = model(compute_input(x, precision)).argmax(1).cpu()
        m += torch.bincount(y.cpu() * num_classes + pred, minlength=num_classes ** 2
                            ).view(num_classes, num_classes)
    return m


def per_class_record(matrix: torch.Tensor, class_names: list[str], depth: int) -> dict:
    """metrics.json's `test_per_class`: the confusion matrix and each class's accuracy."""
    support = matrix.sum(1)
    acc = [float(matrix[i, i]) / int(support[i]) if support[i] else None
           for i in range(len(class_names))]
    return {"depth": depth, "class_names": list(class_names), "confusion": matrix.tolist(),
            "support": support.tolist(), "accuracy": acc}


def eval_precision(run: Run) -> str:
    """The precision evaluation runs in: the run's, or fp32 where this device lacks it (an
    fp16 run re-evaluated on a CPU)."""
    return runnable_precision(run.cfg.precision, run.device)


def evaluate(run: Run) -> list[dict]:
    """Validation and test accuracy of every prefix F_k o G_k (in the run's precision)."""
    precision = eval_precision(run)
    val = evaluate_chain(run.stages, run.raw("val").epoch(), precision)
    test = evaluate_chain(run.stages, run.raw("test").epoch(), precision)
    return [{"val_acc": v["acc"], "val_loss": v["loss"], "test_acc": t["acc"],
             "test_loss": t["loss"]} for v, t in zip(val, test)]


def load_run(run_dir: Path, device: torch.device | None = None, depth: int | None = None,
             bounds: list[int] | None = None, with_data: bool = True) -> Run:
    """Rebuild a trained run from its config.json and module files, in eval mode.

    Args:
        run_dir: the run directory.
        device: where to build it (default: the config's device).
        depth: load the first `depth` modules only (default all; the rest keep their
            initial weights).
        bounds: the module bounds the caller read from metrics.json, checked against the
            rebuilt split.
        with_data: open the data set (eval: an image folder that is gone is read from its
            pack); else `run.data` is the run's stored `Preprocessing` and nothing but the
            run directory is read (predict, export).
    Raises:
        UserError: no run there, bounds that differ, module files that do not match, the
            data gone (an image folder and its pack).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no run directory {run_dir}")
    cfg = RunConfig.load(run_dir / "config.json")
    if not with_data:  # export and predict: PyTorch's default layout, which every exporter
        cfg = dataclasses.replace(cfg, memory_format="contiguous")  # takes (XNNPACK's passes
        # refuse channels-last weights); the weights are the same numbers either way
    data = load_data(cfg, gone_folder=True) if with_data else read_preprocessing(run_dir)
    run = build_run(cfg, data=data, device=device, init=False)  # the module files hold the weights
    if cfg.mode == "e2e":  # one module: the whole network with the last head
        run.stages = [whole_network(run.net, run.stages[-1].head).set_recompute(cfg.recompute)]
    if bounds not in (None, run.bounds):
        raise UserError(f"{run_dir}: module bounds {bounds} in metrics.json differ from "
                        f"{run.bounds} rebuilt from config.json")
    for k, st in enumerate(run.stages[:depth]):
        load_module(run_dir, k, st)
    for st in run.stages:
        st.eval()
    return run


def step_seconds(records: list[dict]) -> float:
    """Seconds spent in optimiser steps (forward, backward, update) over every module and
    epoch: the training time without data loading, cache writes and evaluation."""
    return sum(h.get("step_s", 0.0) for rec in records for h in rec["history"])


def run_metrics(run: Run, records: list[dict], evals: list[dict], seconds: float,
                max_resident: int | None = None) -> dict:
    """metrics.json of a single-process run: `records` are the modules' training records
    (`Trainer.record()`), `evals` their validation and test figures."""
    modules = [module_entry(k, rec, ev) for k, (rec, ev) in enumerate(zip(records, evals))]
    peak = run.memory.peak_rss_mib() if run.memory else peak_rss_mib()
    record = metrics_record(run.cfg.mode, run.bounds, modules,
                          max_resident=len(run.stages) if max_resident is None else max_resident,
                          peak_rss_mib=peak, memory=run.memory.metrics() if run.memory else {},
                          timings={"train_s": seconds, "step_s": step_seconds(records)},
                          device=str(run.device), precision=run.cfg.precision,
                          **(run.finetune or {}))
    if data_record(run.data) is not None:
        record["data"] = data_record(run.data)
    return record


def data_record(data: DataSplits) -> dict | None:
    """metrics.json's `data` of an image folder (split sizes, ignored files, skipped bad
    images); None for a built-in set."""
    if getattr(data, "policy", None) is None:
        return None
    return {k: data.source.get(k) for k in
            ("counts", "ignored_files", "skipped_bad_images", "skipped_files")}


# --------------------------------------------------------------------------- reading a run
def read_finished_run(run_dir: Path) -> tuple[RunConfig, dict]:
    """Config and metrics of a finished run whose module files are all present.

    Raises:
        UserError: no such directory, no config.json or metrics.json, missing module files.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no run directory {run_dir}")
    cfg = RunConfig.load(run_dir / "config.json")
    expected = 1 if cfg.mode == "e2e" else cfg.modules
    missing = [f"{k:02d}" for k in range(expected) if not module_path(run_dir, k).is_file()]
    if missing:
        raise UserError(f"run {run_dir} is missing module files {', '.join(missing)} of "
                        f"{expected} (still training?); export needs a finished run")
    metrics = read_metrics(run_dir / "metrics.json")
    if len(metrics["modules"]) != expected:
        raise UserError(f"{run_dir}/metrics.json lists {len(metrics['modules'])} modules, the "
                        f"configuration {expected}; export needs a finished run")
    return cfg, metrics


def read_metrics(path: Path) -> dict:
    """metrics.json of a finished run (checked to hold the per-module figures)."""
    if not path.is_file():
        raise UserError(f"no metrics.json in {path.parent}: the run has not finished training")
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("modules"), list) \
            or "best_depth" not in metrics:
        raise UserError(f"{path} lacks the per-module accuracies and best_depth")
    return metrics
