"""The peak-memory estimator: each regime's peak per phase, before anything is allocated.

`estimate_peak` builds the run's network and split on the meta device and simulates its
phases there (`edgetrain.budget.simulate`: the product's own step under a dispatch mode that
tracks every live storage), then adds what lives outside tensors' steps (the cache
reader's queue, the cache writer's shard, the data set). The planner (`edgetrain.budget.planner`)
and the budget check (`edgetrain.budget.guard`) rely on it; `benchmarks/results/plan_vs_measured.md`
compares it with peaks measured in fresh processes.

This file measures nothing (that is `edgetrain.measure`) and never reads argv or the
environment.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
import math

import torch

from edgetrain.budget.simulate import (PeakTensors, eval_peak, features_peak, on_cpu, simulate_steps,
                                      step_flops, train_peak)
from edgetrain.measure import buffer_bytes, param_bytes, unique_storage_bytes
from edgetrain.method.loop import make_trainer
from edgetrain.method.split import build_stages, make_bounds
from edgetrain.method.stage import whole_network
from edgetrain.models import create_model
from edgetrain.storage.cache import DTYPES
from edgetrain.units import MIB

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class PeakEstimate:
    """Predicted peak memory of a run per phase, in bytes (tensors only, no runtime).

    `train_step_bytes` is the regime's peak of training tensors: for sequential and multilap
    it is the floor of module-wise training (heaviest module's parameters, gradients,
    optimizer state and saved activations, one input batch, the prefetch buffer).
    `build_bytes` is the start of the run, when the whole network and every head exist
    at once (twice for `--split memory`, which measures a copy). `dataset_bytes` (the raw
    data held in memory; 0 when `n_train` is None) is included in every phase. The process peak RSS is predicted as `runtime_baseline_bytes() + peak_bytes`.
    """

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    input_batch_bytes: int
    prefetch_bytes: int
    heaviest_module: int
    train_step_bytes: int
    cache_write_bytes: int
    eval_bytes: int
    peak_bytes: int
    cache_disk_bytes: int
    dataset_bytes: int = 0
    per_module: list = field(default_factory=list)
    build_bytes: int = 0  # building the run: every stage and head, before offloading

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _StageCost:
    """One stage's tensors at the run's batch size, from the meta simulation."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    input_batch_bytes: int  # float32 input of the stage
    output_batch_bytes: int  # float32 output features
    train_peak_bytes: int  # peak of two steps with the stage alone resident (input included)
    eval_peak_bytes: int  # peak of one eval forward (parameters and input included)
    features_peak_bytes: int  # peak of one cache-write forward and dtype conversion


def _optimizer_bytes(stage: torch.nn.Module, cfg) -> int:
    """Optimizer state a step allocates: SGD momentum 1x, AdamW 2x plus one step scalar each."""
    params = [p for p in stage.parameters() if p.requires_grad]
    n = unique_storage_bytes(params)
    if cfg.optimizer == "adamw":
        return 2 * n + 4 * len(params)
    return n if cfg.momentum > 0 else 0


def _trainers(stages, cfg, transport: bool) -> list:
    return [make_trainer(st, cfg, k, len(stages), 1, transport=transport)
            for k, st in enumerate(stages)]


def _stage_costs(stages, input_shape, cfg, transport: bool, alone: bool) -> list[_StageCost]:
    """Simulate every stage at the run's batch size on the meta device (no compute).

    `alone`: simulate each stage's steps by itself (sequential, multilap); otherwise the
    train figures are left 0 here and the chain is simulated as a whole by the caller.
    """
    B = cfg.batch_size
    trainers = _trainers(stages, cfg, transport)
    shape, costs = tuple(input_shape), []
    for st, tr in zip(stages, trainers):
        with torch.no_grad():
            out = st.eval().features(torch.empty(1, *shape, device="meta")).shape[1:]
        costs.append(_StageCost(
            param_bytes(st), param_bytes(st, trainable_only=True), _optimizer_bytes(st, cfg),
            B * math.prod(shape) * 4, B * math.prod(out) * 4,
            train_peak([tr], shape, cfg) if alone else 0,
            eval_peak([st], shape, B, precision=cfg.precision, workspace=on_cpu(cfg)),
            features_peak(st, shape, B, DTYPES[cfg.cache_dtype], precision=cfg.precision,
                          workspace=on_cpu(cfg))))
        shape = tuple(out)
    return costs


def _build_stages(cfg, input_shape, num_classes: int):
    """The run's stages exactly as `schedule.build_run` cuts them, on the meta device."""
    net = create_model(cfg.model, tuple(input_shape), num_classes, cfg.width, cfg.depth)
    net.to("meta")
    sample = torch.empty(8, *input_shape, device="meta")
    if cfg.mode == "e2e":
        stages = build_stages(net, [0, len(net.blocks)], cfg.head, num_classes, sample)
        stages = [whole_network(net, stages[-1].head)]
    else:
        bounds = make_bounds(net, cfg.modules, cfg.split, sample)
        stages = build_stages(net, bounds, cfg.head, num_classes, sample)
    return [st.to("meta").set_recompute(cfg.recompute) for st in stages]


def _cache_disk_bytes(costs: list[_StageCost], cfg, n_train: int | None) -> int:
    """Disk of the largest set of caches alive at once: the one read and the one written.

    Rule assumed: cache k (output of module k-1) is deleted once module k's output cache is
    written, so at most two caches coexist. Samples: n_train x cache_views plus the
    validation split carved from the same training set (test split size unknown here).
    """
    if cfg.mode in ("e2e", "parallel") or not n_train or len(costs) < 2:
        return 0
    n_val = int(round(n_train * cfg.val_fraction / max(1e-9, 1 - cfg.val_fraction)))
    n = n_train * cfg.cache_views + n_val
    per = [c.output_batch_bytes / cfg.batch_size / 4 * _DTYPE_BYTES[cfg.cache_dtype] * n
           for c in costs[:-1]]
    pairs = [per[0]] + [a + b for a, b in zip(per[:-1], per[1:])]
    return int(max(pairs))


def _sum(costs, attr: str) -> int:
    return sum(getattr(c, attr) for c in costs)


def _shard_bytes(cfg) -> int:
    """`CacheWriter`'s shard size as `sequential` sets it (see `_write`)."""
    return max(MIB, int(cfg.prefetch_mib * MIB) // 4)


def _regime_peaks(costs: list[_StageCost], cfg, prefetch: int, data: int,
                  chain_train: int = 0) -> dict:
    """train_step / cache_write / eval bytes of the regime from per-stage simulations."""
    if cfg.mode in ("e2e", "parallel"):
        # every stage resident: the chain's steps were simulated together (`chain_train`);
        # eval holds every stage's parameters while one stage runs
        P = _sum(costs, "params_bytes")
        ev = max(P - c.params_bytes + c.eval_peak_bytes for c in costs)
        heavy = max(range(len(costs)), key=lambda k: costs[k].eval_peak_bytes)
        return {"heavy": heavy, "train": chain_train + data, "cache": 0, "eval": ev + data}
    heavy = max(range(len(costs)), key=lambda k: costs[k].train_peak_bytes)
    pre = lambda k: prefetch if k > 0 else 0  # noqa: E731  (module 0 reads the raw data)
    train = costs[heavy].train_peak_bytes + pre(heavy)
    # CacheWriter: up to one shard of buffered rows plus the batch being split into them
    cache = max((s.features_peak_bytes + _shard_bytes(cfg) + pre(k)
                 + s.output_batch_bytes * _DTYPE_BYTES[cfg.cache_dtype] // 4
                 for k, s in enumerate(costs[:-1])), default=0)
    ev = max(s.eval_peak_bytes + pre(k) for k, s in enumerate(costs))
    return {"heavy": heavy, "train": train + data, "cache": cache + data if cache else 0,
            "eval": ev + data}


def _prefetch_bytes(costs: list[_StageCost], cfg, n_train: int | None) -> int:
    """The cache reader's bounded queue (`edgetrain.storage.cache.max_batches` float32 batches, at
    most one epoch's worth) plus the batch its thread is producing, for the heaviest input."""
    if cfg.mode in ("e2e", "parallel") or len(costs) < 2:
        return 0
    batch = max(c.input_batch_bytes for c in costs[1:])  # float32, (B, *shape)
    row_ratio = 1 + _DTYPE_BYTES[cfg.cache_dtype] / 4  # float32 batch + storage-dtype buffer
    queued = max(1, int(cfg.prefetch_mib * MIB // (batch * row_ratio)))
    if n_train:
        queued = min(queued, math.ceil(n_train / cfg.batch_size))
    return (queued + 1) * batch


def _dataset_bytes(cfg, input_shape, n_train: int | None) -> int:
    if not n_train:
        return 0
    n_val = n_train * cfg.val_fraction / max(1e-9, 1 - cfg.val_fraction)
    # images stream from the data pack (issue 15): resident are each split's int64 labels and
    # row numbers, plus the raw uint8 batches the reader prefetches (at most --prefetch-mib)
    raw_batches = min(cfg.prefetch_mib * 2**20, (n_train + n_val) * math.prod(input_shape))
    return int((n_train + n_val) * 16 + raw_batches)


def estimate_peak(cfg, input_shape: tuple[int, int, int], num_classes: int,
                 n_train: int | None = None) -> PeakEstimate:
    """Predict a run's peak memory per phase (tensors only).

    Builds the run's network and split on the meta device and simulates the regime's
    phases there (`edgetrain.budget.simulate`: the product's own step, twice, under a dispatch
    mode that tracks every live storage): e2e/parallel train the chain of resident stages;
    sequential/multilap train each module alone, write its cache and evaluate it. To the
    simulated tensor peaks it adds what lives outside the step: the cache reader's queue,
    the cache writer's shard buffers and the data set held in memory. Shapes only, no
    compute: about a second for a ResNet-110 at 96x96.

    Args:
        cfg: the run configuration (model, width, depth, modules, split, head, mode,
            optimizer, batch_size, transport, cache_dtype, prefetch_mib, precision, ...).
        input_shape: (C, H, W) of one sample.
        num_classes: number of classes.
        n_train: training samples (for the dataset held in memory and the cache disk).

    Returns:
        PeakEstimate with bytes per class of tensor and per phase.
    """
    with torch.random.fork_rng(devices=[]):
        stages = _build_stages(cfg, input_shape, num_classes)
    transport = bool(cfg.transport and cfg.mode != "e2e")
    chained = cfg.mode in ("e2e", "parallel")
    costs = _stage_costs(stages, input_shape, cfg, transport, alone=not chained)
    chain_train = (train_peak(_trainers(stages, cfg, transport), tuple(input_shape), cfg)
                   if chained else 0)
    prefetch = _prefetch_bytes(costs, cfg, n_train)
    data = _dataset_bytes(cfg, input_shape, n_train)
    r = _regime_peaks(costs, cfg, prefetch, data, chain_train)
    resident = costs if chained else [costs[r["heavy"]]]
    c = costs[r["heavy"]]
    fixed = (_sum(resident, "params_bytes") + _sum(resident, "grads_bytes")
             + _sum(resident, "optimizer_bytes"))
    step = chain_train if chained else c.train_peak_bytes
    build = (_sum(costs, "params_bytes") + sum(buffer_bytes(st) for st in stages)) * (
        2 if cfg.split == "memory" and not cfg.mode == "e2e" else 1) + data
    return PeakEstimate(
        params_bytes=_sum(resident, "params_bytes"), grads_bytes=_sum(resident, "grads_bytes"),
        optimizer_bytes=_sum(resident, "optimizer_bytes"),
        activations_bytes=max(0, step - fixed - c.input_batch_bytes),
        input_batch_bytes=c.input_batch_bytes, prefetch_bytes=prefetch if r["heavy"] > 0 else 0,
        heaviest_module=r["heavy"], train_step_bytes=r["train"], cache_write_bytes=r["cache"],
        eval_bytes=r["eval"], peak_bytes=max(r["train"], r["cache"], r["eval"], build),
        build_bytes=build,
        cache_disk_bytes=_cache_disk_bytes(costs, cfg, n_train), dataset_bytes=data,
        per_module=[asdict(s) for s in costs])


def peak_breakdown(cfg, input_shape: tuple[int, int, int], num_classes: int,
                   module: int | None = None) -> dict:
    """The floor analysis: every tensor storage alive at the peak of a training step.

    Simulates the training steps of `module` (default: the one with the highest training
    peak; the whole chain for e2e/parallel) on the meta device and lists what is alive at
    its peak: the operator that made each storage ("parameter", "buffer", "optimizer state",
    "input" for the batch), shape, dtype and MiB, largest first.
    """
    with torch.random.fork_rng(devices=[]):
        stages = _build_stages(cfg, input_shape, num_classes)
    transport = bool(cfg.transport and cfg.mode != "e2e")
    trainers = _trainers(stages, cfg, transport)
    shapes = _feature_shapes(stages, input_shape)
    if cfg.mode in ("e2e", "parallel"):
        chain, in_shape, k = trainers, shapes[0], None
    else:
        if module is None:
            module = max(range(len(stages)),
                         key=lambda j: train_peak([trainers[j]], shapes[j], cfg))
        chain, in_shape, k = [trainers[module]], shapes[module], module
    mode = simulate_steps(PeakTensors(workspace=on_cpu(cfg)), chain, in_shape, cfg)
    items = sorted(mode.at_peak, key=lambda t: -t[3])
    return {"module": k, "peak_mib": mode.peak / MIB,
            "tensors": [{"made_by": o, "shape": list(s), "dtype": d, "mib": round(n / MIB, 3)}
                        for o, s, d, n in items]}


def _feature_shapes(stages, input_shape) -> list[tuple]:
    """The input shape of every stage, then the last stage's output shape (no batch dim)."""
    shapes = [tuple(input_shape)]
    with torch.no_grad():
        for st in stages:
            shapes.append(tuple(st.eval().features(torch.empty(1, *shapes[-1], device="meta"))
                                .shape[1:]))
    return shapes


def recompute_time_ratio(cfg, input_shape: tuple[int, int, int], num_classes: int) -> float:
    """Estimated training time of `cfg` over the same run with `recompute="none"` (1.0 when
    `cfg.recompute` is "none"): the FLOPs of one training step of every trained module, as
    simulated on the meta device (`edgetrain.budget.simulate.step_flops`), with and without.

    With --recompute, a module's backward runs its forward again (all of it for `blocks` and
    for `segments:S` alike; the head's is not repeated): with backward ~ 2 forwards, about
    (fwd + bwd + fwd) / (fwd + bwd) ~ 1.33x for the module body. Sequential and multi-lap
    modules are summed (each trains the same number of steps); e2e and parallel step the
    resident chain. It is an estimate: FLOPs leave out element-wise work, memory traffic and
    the checkpointing bookkeeping. The measured figure for ResNet-110 3x96x96 b64 K=16
    (`--recompute blocks`) was 1.49x the step time without it
    (benchmarks/results/memory_resnet110_3x96x96_b64_cpu-recompute-K16.json).
    """
    if cfg.recompute == "none":
        return 1.0
    plain = _train_flops(dataclasses.replace(cfg, recompute="none"), input_shape, num_classes)
    return _train_flops(cfg, input_shape, num_classes) / max(1, plain)


def _train_flops(cfg, input_shape, num_classes: int) -> int:
    """FLOPs of one training step of every module the regime trains (see above)."""
    with torch.random.fork_rng(devices=[]):
        stages = _build_stages(cfg, input_shape, num_classes)
    trainers = _trainers(stages, cfg, bool(cfg.transport and cfg.mode != "e2e"))
    shapes = _feature_shapes(stages, input_shape)
    if cfg.mode in ("e2e", "parallel"):
        return step_flops(trainers, shapes[0], cfg)
    return sum(step_flops([tr], shape, cfg) for tr, shape in zip(trainers, shapes))
