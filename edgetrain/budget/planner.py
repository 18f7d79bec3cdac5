"""The planner: search regime, K, split, batch size, cache dtype and (when nothing else fits)
in-module recomputation for the configuration that fits a memory budget, and print it.

What this file holds: `plan` (the rule is in its docstring and docs/fit-a-device.md) and
`plan_for_device`; the fitting margin (`SAFETY`, `HEADROOM_BYTES`, `needed_bytes`); the
`Plan` it returns (with the data pack the run will write, beside its caches), `format_plan`
and `train_command`, the `edgetrain train` command that runs a plan.

What it is not: a memory model. Every predicted byte comes from the estimator
(`edgetrain.budget.estimate.estimate_peak`) and the runtime's measured baseline
(`edgetrain.measure.runtime_baseline_bytes`); this file only searches over them. Device
profiles are in `edgetrain.budget.devices`, enforcement during training in
`edgetrain.budget.guard`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
from pathlib import Path
import shlex

from edgetrain.budget.devices import DeviceProfile
from edgetrain.budget.estimate import estimate_peak, recompute_time_ratio
from edgetrain.budget.guard import check_runtime_fits
from edgetrain.config import BUDGET_FIELDS, RunConfig, option_args
from edgetrain.errors import UserError
from edgetrain.measure import runtime_baseline_bytes
from edgetrain.method.precision import Bf16Check, resolve_precision
from edgetrain.models import create_model
from edgetrain.regimes.run import preview_run_data, resolve_device
from edgetrain.units import MIB, fmt_bytes

# A plan fits when runtime + SAFETY x predicted tensor peak + HEADROOM_BYTES <= budget. The
# predictor simulates the product's own steps on the meta device, so the margin only covers
# what it does not see: allocator and kernel scratch, the oneDNN primitive cache, thread
# buffers, Python objects. In fresh processes on this machine the measured process peaks were
# 1.01-1.07x runtime + predicted tensors, and at most 55 MiB above it in absolute terms
# (benchmarks/results/plan_vs_measured.md).
SAFETY = 1.15
HEADROOM_BYTES = 64 * 1024 * 1024
GOOD_BATCH = 32  # batches below this are tried only when nothing fits at GOOD_BATCH or above
MIN_BATCH = 8
# The RunConfig fields the planner chooses; `plan(fixed=...)` keeps any of them as given.
# Precision (#17) is not planned: it changes accuracy, so the given one is passed through to
# every candidate (the estimator models it); model, data, epochs, seed and lr are never planned.
PLANNED = ("mode", "modules", "split", "batch_size", "cache_dtype", "laps", "recompute")
# `--recompute` settings in order of cost, each tried only when nothing fits with the ones
# before it: none; two checkpointed segments per module (keeps two segment inputs and one
# segment's internals); one per block (keeps every block's input and one block's internals).
# Both recomputing settings run the module's forward again during backward, so they cost
# about the same time; `blocks` saves more memory. The printed time cost is an estimate
# (`recompute_time_ratio`: simulated FLOPs, ~1.3x); the measured step-time ratio for
# ResNet-110 3x96x96 b64 sequential K=16 with `blocks` was 1.49x
# (benchmarks/results/memory_resnet110_3x96x96_b64_cpu-recompute-K16.json).
RECOMPUTE_ORDER = ("none", "segments:2", "blocks")


# --------------------------------------------------------------------------- planner
@dataclass
class Plan:
    """A configuration that fits (or, when `fits` is False, the least demanding one)."""

    cfg: RunConfig
    prediction: object  # edgetrain.budget.estimate.PeakEstimate
    baseline_bytes: int
    needed_bytes: int  # baseline + SAFETY * predicted tensor peak + HEADROOM_BYTES
    budget_bytes: int
    fits: bool
    profile: DeviceProfile | None
    tried: int  # configurations evaluated
    disk_bytes: int = 0  # disk the run needs at once (caches and module files)
    disk_free_bytes: int | None = None  # free space where they go (None: not checked)
    # estimated training time over the same plan without --recompute (1.0 without it)
    step_time_ratio: float = 1.0
    pack_bytes: int = 0  # the data pack opening the data will write (0: it is there)
    pack_dir: Path | None = None  # where the data pack is or will be (None: not looked at)
    pack_free_bytes: int | None = None  # free space of its data cache (None: not checked)
    precision_note: str | None = None  # `--precision auto`: what it chose and why

    def command(self) -> str:
        """The exact `edgetrain train` command that runs this plan under its budget."""
        return train_command(self.cfg, self.profile)


def needed_bytes(pred, baseline_bytes: int) -> int:
    """Resident bytes a configuration is planned to need: runtime plus padded tensor peak."""
    return baseline_bytes + math.ceil(pred.peak_bytes * SAFETY) + HEADROOM_BYTES


def _batches(max_batch: int, fixed: bool = False) -> tuple[list[int], list[int]]:
    if fixed:
        return [max_batch], []
    sizes, b = [], max_batch
    while b >= MIN_BATCH:
        sizes.append(b)
        b //= 2
    sizes = sizes or [max_batch]
    good = [b for b in sizes if b >= GOOD_BATCH] or sizes[:1]
    return good, [b for b in sizes if b not in good]


def _module_counts(n_blocks: int) -> list[int]:
    ks, k = [], 2
    while k < n_blocks:
        ks.append(k)
        k *= 2
    return ks + [n_blocks] if n_blocks >= 2 else []


def _dtypes(preferred: str) -> list[str]:
    # the preferred storage dtype first, then a smaller one when there is one
    return [preferred] + (["float16"] if preferred == "float32" else [])


def _groups(base: RunConfig, n_blocks: int, cache_dtype: str, fixed=frozenset()):
    """(mode, K) groups in order of preference, each with its variants (split, cache dtype),
    leaving out every choice that contradicts a field in `fixed` (kept as in `base`)."""
    ks = [base.modules] if "modules" in fixed else _module_counts(n_blocks)
    dtype = base.cache_dtype if "cache_dtype" in fixed else cache_dtype
    for mode in ("e2e", "parallel", "multilap"):
        if "mode" in fixed and _family(base.mode) != mode:
            continue
        if mode == "multilap" and "laps" in fixed and base.epochs % base.laps:
            continue  # the laps given do not divide the epochs: only one-lap regimes remain
        if mode == "e2e":
            if "modules" not in fixed or base.modules == 1 or "mode" in fixed:
                yield "e2e", 1, [(base.split if "split" in fixed else "depth", base.cache_dtype)]
            continue
        dts = ([dtype] if "cache_dtype" in fixed else _dtypes(dtype)) if mode == "multilap" \
            else [base.cache_dtype]
        for k in ks:
            splits = ("depth", "memory") if k < n_blocks else ("depth",)  # K = blocks: one split
            splits = (base.split,) if "split" in fixed else splits
            yield mode, k, [(split, dt) for split in splits for dt in dts]


def _family(mode: str) -> str:
    return "multilap" if mode == "sequential" else mode  # sequential is multilap of one lap


def _laps(base: RunConfig, mode: str, fixed) -> tuple[str, int]:
    """(mode, laps) for a module-wise plan: the given laps, or the largest number of laps
    up to `base.laps` that divides the epochs (one lap is sequential)."""
    if mode != "multilap":
        return mode, base.laps
    if "mode" in fixed and base.mode == "sequential":
        return "sequential", base.laps
    laps = base.laps if "laps" in fixed else max(
        r for r in range(1, base.laps + 1) if base.epochs % r == 0)
    return ("multilap" if laps > 1 or "mode" in fixed else "sequential"), laps


def _config(base: RunConfig, mode: str, k: int, batch: int, variant, fixed=frozenset()
            ) -> RunConfig:
    split, dtype = variant
    mode, laps = _laps(base, mode, fixed)
    return dataclasses.replace(base, mode=mode, modules=k, batch_size=batch, split=split,
                               cache_dtype=dtype, laps=laps)


def _count_blocks(cfg: RunConfig, input_shape, num_classes: int) -> int:
    net = create_model(cfg.model, tuple(input_shape), num_classes, cfg.width, cfg.depth)
    return len(net.blocks)


class _Evaluator:
    """Predicts and remembers every configuration tried; keeps the least demanding one, and
    whether any missed the budget by its training step alone (`train_bound`: the one phase
    that `--recompute` lowers)."""

    def __init__(self, input_shape, num_classes, n_train, budget_bytes, profile, baseline,
                 disk_free: int | None = None):
        self._predict = lambda cfg: estimate_peak(cfg, tuple(input_shape), num_classes, n_train)
        self.budget_bytes, self.profile, self.baseline = budget_bytes, profile, baseline
        self.disk_free = disk_free
        self.tried, self.least, self.train_bound = 0, None, False

    def __call__(self, cfg: RunConfig) -> Plan:
        pred = self._predict(cfg)
        self.tried += 1
        need, disk = needed_bytes(pred, self.baseline), disk_needed_bytes(pred)
        on_disk = self.disk_free is None or disk <= self.disk_free
        p = Plan(cfg, pred, self.baseline, need, self.budget_bytes,
                 need <= self.budget_bytes and on_disk, self.profile, 0, disk, self.disk_free)
        if self.least is None or need < self.least.needed_bytes:
            self.least = p
        if not p.fits and on_disk and self._fits_but_training(pred):
            self.train_bound = True
        return p

    def _fits_but_training(self, pred) -> bool:
        """Whether every phase but the training step (cache write, eval, building) fits."""
        rest = max(pred.cache_write_bytes, pred.eval_bytes, pred.build_bytes)
        return self.baseline + math.ceil(rest * SAFETY) + HEADROOM_BYTES <= self.budget_bytes


def disk_needed_bytes(pred) -> int:
    """Disk a run holds at once: the live caches plus every module file with its optimizer
    state (they are written at each checkpoint)."""
    modules = sum(m["params_bytes"] + m["optimizer_bytes"] for m in pred.per_module)
    return pred.cache_disk_bytes + modules


def _search(base: RunConfig, n_blocks: int, cache_dtype: str, evaluate: _Evaluator,
            fixed=frozenset()):
    good, small = _batches(base.batch_size, "batch_size" in fixed)
    for tier in (good, small):
        if not tier:  # a given batch size leaves the small tier empty
            continue
        for mode, k, variants in _groups(base, n_blocks, cache_dtype, fixed):
            # memory grows with the batch: a variant that misses at the tier's smallest
            # batch misses at every larger one, so only the survivors are tried further
            at_min = [evaluate(_config(base, mode, k, tier[-1], v, fixed)) for v in variants]
            alive = [v for v, p in zip(variants, at_min) if p.fits]
            for b in tier[:-1]:
                for v in alive:
                    p = evaluate(_config(base, mode, k, b, v, fixed))
                    if p.fits:
                        return p
            if alive:
                return at_min[variants.index(alive[0])]
    return None


def plan(base: RunConfig, input_shape, num_classes: int, n_train: int | None,
         budget_bytes: int, profile: DeviceProfile | None = None, fixed=frozenset(),
         disk_free: int | None = None) -> Plan:
    """Choose the configuration with the best expected accuracy/speed that fits the budget.

    The rule, first match wins: batches of at least GOOD_BATCH (from `base.batch_size`
    halving down) are tried before smaller ones (down to MIN_BATCH); within that, end-to-end
    is preferred (the most accurate), then parallel, then multi-lap sequential (one module
    resident); within a regime the smallest K (closer to end-to-end), then the largest
    batch, then the depth split before the memory-balanced one, then the profile's cache
    dtype before a smaller one. A configuration fits when `needed_bytes` (runtime baseline,
    SAFETY times the predicted tensor peak, HEADROOM_BYTES) is within the budget. Predicted
    memory is taken to grow with the batch size, which prunes the search.

    Fields named in `fixed` (any of `PLANNED`: what the user gave) keep `base`'s value and
    the candidates that contradict them are skipped. Without `laps` fixed, a module-wise
    plan runs the largest number of laps up to `base.laps` that divides `base.epochs` (one
    lap: sequential). With `disk_free`, a candidate fits only when `disk_needed_bytes` (its
    caches and module files) is within it too.

    In-module recomputation (`--recompute`) trades time for memory, so it is tried only when
    no configuration fits without it: the whole search above is repeated for each setting
    of RECOMPUTE_ORDER in turn (unless `recompute` is fixed), as long as some candidate
    missed the budget by its training step alone (recomputation lowers no other phase, so
    otherwise nothing could fit with it). The plan records the setting and its estimated
    cost in time (`Plan.step_time_ratio`, `recompute_time_ratio`).

    Returns:
        The first fitting plan; if none fits, the plan that needs the least memory among
        the candidates searched, with `fits=False` (its `needed_bytes` is a budget that
        would do: the smallest one unless the recompute settings were left out as above).

    Raises:
        UserError: a budget below the runtime itself, or a bad model/configuration.
    """
    baseline = runtime_baseline_bytes()
    check_runtime_fits(budget_bytes, baseline)
    dtype = profile.cache_dtype if profile else base.cache_dtype
    evaluate = _Evaluator(input_shape, num_classes, n_train, budget_bytes, profile, baseline,
                          disk_free)
    n_blocks = _count_blocks(base, input_shape, num_classes)
    fixed, chosen = frozenset(fixed), None
    for i, recompute in enumerate(_recompute_levels(base, fixed)):
        if i and not evaluate.train_bound:
            break  # every candidate misses in a phase that recomputation does not lower
        chosen = _search(dataclasses.replace(base, recompute=recompute), n_blocks, dtype,
                         evaluate, fixed)
        if chosen is not None:
            break
    chosen = chosen or evaluate.least
    if chosen is None:
        raise UserError(f"the options given ({', '.join(sorted(fixed))}) leave no "
                        "configuration to plan; give fewer of them")
    chosen.tried = evaluate.tried
    chosen.step_time_ratio = recompute_time_ratio(chosen.cfg, tuple(input_shape), num_classes)
    return chosen


def _recompute_levels(base: RunConfig, fixed) -> tuple[str, ...]:
    """The `--recompute` settings to search, cheapest first: the given one when fixed."""
    return (base.recompute,) if "recompute" in fixed else RECOMPUTE_ORDER


def plan_for_device(base: RunConfig, profile: DeviceProfile | None,
                    budget_bytes: int | None = None, fixed=frozenset()) -> Plan:
    """Preview the data set (its shape and size, and the data pack it will write; nothing is
    written: `preview_run_data`) and plan for `profile` (its budget and device) or, without
    one, for `budget_bytes`, keeping the `PLANNED` fields named in `fixed` as in `base`.
    Free disk space is not checked (a plan is often made away from the device; `train --fit`
    checks it, `edgetrain.budget.fit`).

    Raises:
        UserError: neither a profile nor a budget, or whatever `plan` raises.
    """
    if profile is None and budget_bytes is None:
        raise UserError("planning needs a device profile or a memory budget")
    if profile is not None:
        base = dataclasses.replace(base, device=profile.train_device)
    base, note = planned_precision(base, profile)
    data = preview_run_data(base)
    shape, classes, n_train = data_shape(base, data)
    p = plan(base, shape, classes, n_train, budget_bytes or profile.budget_bytes, profile,
             fixed=fixed)
    p.pack_bytes, p.pack_dir, p.precision_note = data.pack.write_bytes, data.pack.directory, note
    return p


def profile_bf16(profile: DeviceProfile) -> Bf16Check:
    """What a device profile says of native bf16 (`devices calibrate` records it)."""
    if profile.bf16 is None:
        return Bf16Check(False, f"profile {profile.name} does not record bf16 (run `edgetrain "
                                "devices calibrate` on the device)")
    return Bf16Check(profile.bf16, f"profile {profile.name} records bf16 = "
                                   f"{str(profile.bf16).lower()}")


def planned_precision(base: RunConfig, profile: DeviceProfile | None):
    """`base` with `--precision auto` resolved for the device planned for (the profile's
    record, or without one this machine), and the plan's line saying so (None if given)."""
    if base.precision != "auto":
        return base, None
    if profile is not None:
        return resolve_precision(base, profile.train_device, profile_bf16(profile))
    return resolve_precision(base, resolve_device(base.device))


def data_shape(cfg: RunConfig, data) -> tuple[tuple[int, int, int], int, int]:
    """(input shape, number of classes, training samples) of the run's data (`data`: its
    `DataPreview` or `DataSplits`). Synthetic data of a given shape is planned, as it always
    was, for all its samples (`train_size` or `synthetic_size`, before any split)."""
    if cfg.data == "synthetic" and cfg.input_shape is not None:
        return tuple(cfg.input_shape), 10, cfg.train_size or cfg.synthetic_size
    return data.input_shape, data.num_classes, len(data.train)


# --------------------------------------------------------------------------- output
_ALWAYS = ("data", "model", "mode", "modules", "split", "batch_size", "epochs")


def train_command(cfg: RunConfig, profile: DeviceProfile | None = None) -> str:
    """`edgetrain train ...` reproducing `cfg`: the planned fields plus every non-default one."""
    default, args = RunConfig(), ["edgetrain", "train"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if not f.metadata["cli"] or f.name in BUDGET_FIELDS + ("transport", "precision_requested") or (
                f.name not in _ALWAYS and v == getattr(default, f.name)):
            continue
        if cfg.mode != "multilap" and f.name in ("laps", "cache_dtype", "cache_views"):
            continue
        args += option_args(f.name, v)
    args += option_args("transport", cfg.transport)
    if profile is not None:
        args += ["--device-profile", profile.name]
    elif cfg.memory_budget is not None:
        args += ["--memory-budget", str(cfg.memory_budget)]
    return shlex.join(args)


def format_plan(p: Plan) -> str:
    """A human-readable plan: device, choice, predicted peak per phase, cache disk, command."""
    c, pr = p.cfg, p.prediction
    lines = []
    if p.profile is not None:
        lines.append(f"device      {p.profile.name}: {p.profile.description}")
    lines.append(f"budget      {fmt_bytes(p.budget_bytes)} for the training process")
    if p.precision_note:
        lines.append(p.precision_note)
    split = f", split {c.split}" if c.mode != "e2e" else ""
    cache = f", cache {c.cache_dtype}" if c.mode == "multilap" else ""
    recompute = f", recompute {c.recompute}" if c.recompute != "none" else ""
    lines.append(f"plan        {c.mode}, K={c.modules}{split}, batch {c.batch_size}{cache}"
                 f"{recompute}  ({p.tried} configurations evaluated)")
    if c.recompute != "none":
        lines.append(f"recompute   {c.recompute}: trades time for memory, each training step "
                     f"~{p.step_time_ratio:.2f}x as long as without it (estimated from "
                     "simulated FLOPs)")
    rows = [("runtime baseline", p.baseline_bytes), ("parameters", pr.params_bytes),
            ("gradients", pr.grads_bytes), ("optimizer state", pr.optimizer_bytes),
            ("saved activations", pr.activations_bytes), ("input batch", pr.input_batch_bytes),
            ("prefetch buffer", pr.prefetch_bytes), ("phase: train step", pr.train_step_bytes),
            ("phase: cache write", pr.cache_write_bytes), ("phase: eval", pr.eval_bytes),
            ("peak (tensors)", pr.peak_bytes),
            (f"needed (runtime + {SAFETY:g} x peak + {HEADROOM_BYTES // MIB} MiB)",
             p.needed_bytes)]
    lines.append(f"predicted   heaviest module: {pr.heaviest_module}")
    lines += [f"            {k:<44} {fmt_bytes(v):>11}" for k, v in rows]
    lines.append(f"cache disk  {fmt_bytes(pr.cache_disk_bytes)}" + _disk_time(p))
    if p.pack_dir is not None:
        lines.append(f"data pack   {format_pack(p)}")
    return "\n".join(lines)


def format_pack(p: Plan) -> str:
    """Where the data pack is or goes and what writing it takes (`Plan.pack_bytes`)."""
    if not p.pack_bytes:
        return f"{p.pack_dir} (there already: nothing to write)"
    free = "" if p.pack_free_bytes is None else f", {fmt_bytes(p.pack_free_bytes)} free there"
    return (f"{fmt_bytes(p.pack_bytes)} to write once, in {p.pack_dir.parent} "
            f"(--data-cache{free})")


def _disk_time(p: Plan) -> str:
    if p.profile is None or not p.prediction.cache_disk_bytes:
        return ""
    mib = p.prediction.cache_disk_bytes / MIB
    return (f" (one pass: write ~{mib / p.profile.storage_write_mib_s:.0f} s, "
            f"read ~{mib / p.profile.storage_read_mib_s:.0f} s on {p.profile.storage})")

