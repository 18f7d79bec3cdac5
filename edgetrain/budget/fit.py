"""`edgetrain train --fit`: plan what fits the budget around the options the user gave, then
train it.

What this file holds: `fit_config` (the options the user gave stay fixed; the planner
chooses the rest among `planner.PLANNED`), the disk the run needs against the free space of
its directories (`Disk`: the caches and module files in the run's cache directory, the data
pack in the data cache, summed where both are on one file system; `free_bytes`,
`bytes_written`), and the text printed before training (`format_fit`). The search rule and
the memory margin are the planner's (`edgetrain.budget.planner.plan`); the budget is
enforced during training by `edgetrain.budget.guard` as in any budgeted run. The chosen
values are plain RunConfig fields, written to config.json, so `--resume`, eval and export
need nothing from here.

What it is not: a CLI (it never reads argv) or a trainer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import os
from pathlib import Path
import shutil

from edgetrain.budget.devices import load_profile
from edgetrain.budget.guard import apply_budget_options
from edgetrain.budget.planner import PLANNED, Plan, format_plan, plan
from edgetrain.config import RunConfig, config_from_options
from edgetrain.errors import UserError
from edgetrain.method.precision import resolve_precision
from edgetrain.regimes.run import preview_run_data, resolve_device
from edgetrain.storage.cache import free_space_margin
from edgetrain.units import fmt_bytes

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _existing(directory: Path) -> Path:
    """`directory`, or its nearest existing parent (where it would be created)."""
    d = Path(directory).expanduser().resolve()
    while not d.exists():
        d = d.parent
    return d


def free_bytes(directory: Path) -> int:
    """Free bytes of the file system that will hold `directory` (its nearest existing parent)."""
    return shutil.disk_usage(_existing(directory)).free


def same_filesystem(a: Path, b: Path) -> bool:
    """Whether `a` and `b` (or their nearest existing parents) are on one file system."""
    return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev


@dataclass
class Disk:
    """Where a run writes and the free space there: the activation caches and module files
    in `run_dir`, the data pack (`pack_bytes`, 0 when it is there) in the data cache
    `data_dir`. On one file system (`shared`) they are counted against one free space."""

    run_dir: Path
    data_dir: Path
    pack_bytes: int
    run_free: int
    data_free: int
    shared: bool

    @property
    def pack_fits(self) -> bool:
        """The pack fits its data cache with the margin the packer keeps
        (`edgetrain.storage.cache.check_free_space`), so packing will not refuse."""
        return not self.pack_bytes or \
            self.pack_bytes + free_space_margin(self.pack_bytes) <= self.data_free

    @property
    def room(self) -> int:
        """Free bytes left in `run_dir` for the caches and module files, once packed."""
        return self.run_free - (self.pack_bytes if self.shared else 0)


def run_disk(run_dir: Path, data_dir: Path, pack_bytes: int) -> Disk:
    """The `Disk` of a run writing in `run_dir` whose data pack goes to `data_dir`."""
    shared = same_filesystem(run_dir, data_dir)
    run_free = free_bytes(run_dir)
    return Disk(Path(run_dir), Path(data_dir), pack_bytes, run_free,
                run_free if shared else free_bytes(data_dir), shared)


def pack_refusal(disk: Disk, data: str) -> str:
    """The one line of a data pack that does not fit its data cache."""
    need = disk.pack_bytes + free_space_margin(disk.pack_bytes)
    return (f"the data pack of {data} needs {fmt_bytes(need)} (with the packer's margin) in the "
            f"data cache {disk.data_dir}, which has {fmt_bytes(disk.data_free)} free: free "
            "space there or give --data-cache DIR on a larger disk")


def bytes_written(p: Plan, n_train: int, n_val: int, n_test: int) -> int:
    """Bytes a run writes in all (SD cards wear by it): every cache of every lap (train rows
    with their views each lap, validation and test rows in the last lap), and the module
    files with optimizer state at every epoch checkpoint."""
    cfg, mods = p.cfg, p.prediction.per_module
    module_bytes = sum(m["params_bytes"] + m["optimizer_bytes"] for m in mods)
    if cfg.mode in ("e2e", "parallel"):
        return module_bytes * (cfg.epochs + 1)
    rows = cfg.n_laps * n_train * cfg.cache_views + n_val + n_test
    row = lambda m: m["output_batch_bytes"] // cfg.batch_size // 4 * _DTYPE_BYTES[cfg.cache_dtype]  # noqa: E731
    caches = sum(row(m) * rows for m in mods[:-1])
    return caches + module_bytes * (cfg.epochs + 1)


def _base_options(opts: dict, given: set[str]) -> dict:
    """The options the planner starts from: what was given, and defaults that cannot
    contradict them (a multilap default of 2 laps with 1 epoch would be refused)."""
    opts = dict(opts)
    if "mode" not in given:
        opts["mode"] = "e2e"  # a placeholder the planner replaces; valid with any epochs
    elif opts["mode"] == "multilap" and "laps" not in given:
        opts["laps"] = max(r for r in range(1, opts["laps"] + 1) if opts["epochs"] % r == 0)
    return opts


def fit_config(opts: dict, given: set[str], profile_name: str | None, budget_text: str | None,
               out_dir: Path, root: Path | None = None) -> tuple[RunConfig, str]:
    """The configuration `train --fit` trains, and the plan text to print before it.

    Args:
        opts: `edgetrain train`'s RunConfig options (as `config_from_options` takes them).
        given: the RunConfig fields the user gave on the command line: kept as given.
        profile_name, budget_text: `--device-profile` / `--memory-budget` (exactly one).
        out_dir: the run directory (its file system holds the caches without --cache-dir).
        root: the devices directory (default: the repository's `devices/`).
    Returns:
        (the chosen configuration with its budget, the text to print).
    Raises:
        UserError: no budget, a CUDA profile without CUDA, a bad option, or nothing fits
            in memory or on disk (one line: the smallest budget that would fit and the
            closest candidate).
    """
    if not (profile_name or budget_text):
        raise UserError("--fit needs --device-profile NAME or --memory-budget SIZE")
    if "train_modules" in given and "modules" not in given:  # the range names modules of a K
        raise UserError("--fit with --train-modules needs -K too: the range counts modules of "
                        "a split the planner would otherwise choose")
    opts = apply_budget_options(opts, profile_name, budget_text, root)
    if "precision" not in given:  # --fit takes the fast path where the device has one
        opts = {**opts, "precision": "auto"}
    profile = load_profile(profile_name, root) if profile_name else None
    base = config_from_options(_base_options(opts, given))
    if profile is not None and "device" not in given:
        base = dataclasses.replace(base, device=profile.train_device)
    base, note = resolve_precision(base, resolve_device(base.device))  # trained here
    data = preview_run_data(base)  # its own shape and size and its pack; nothing written
    disk = run_disk(Path(base.cache_dir) if base.cache_dir else Path(out_dir),
                    data.pack.directory.parent, data.pack.write_bytes)
    if not disk.pack_fits:
        raise UserError(pack_refusal(disk, base.data))
    p = plan(base, data.input_shape, data.num_classes, len(data.train), base.memory_budget,
             profile, fixed=set(given) & set(PLANNED), disk_free=disk.room)
    p.pack_bytes, p.pack_dir, p.pack_free_bytes = (disk.pack_bytes, data.pack.directory,
                                                  disk.data_free)
    p.precision_note = note
    if not p.fits:
        raise UserError(nothing_fits(p, disk))
    written = bytes_written(p, len(data.train), len(data.val), len(data.test)) + disk.pack_bytes
    return with_plan_record(p, written), format_fit(p, base, given, disk, written)


def with_plan_record(p: Plan, written: int) -> RunConfig:
    """The chosen configuration, with what was predicted in `fit_record` (config.json
    keeps it beside the run, as `extra["fit"]`; nothing reads it to train)."""
    pr = p.prediction
    record = {"budget_bytes": p.budget_bytes, "needed_bytes": p.needed_bytes,
              "runtime_baseline_bytes": p.baseline_bytes, "peak_tensor_bytes": pr.peak_bytes,
              "train_step_bytes": pr.train_step_bytes, "cache_write_bytes": pr.cache_write_bytes,
              "eval_bytes": pr.eval_bytes, "disk_bytes": p.disk_bytes, "written_bytes": written,
              "data_pack_bytes": p.pack_bytes, "step_time_ratio": round(p.step_time_ratio, 4)}
    return dataclasses.replace(p.cfg, fit_record=record)


def _describe(c: RunConfig) -> str:
    laps = f", {c.laps} laps" if c.mode == "multilap" else ""
    cache = f", cache {c.cache_dtype}" if c.mode in ("sequential", "multilap") else ""
    recompute = f", recompute {c.recompute}" if c.recompute != "none" else ""
    return (f"{c.mode}, K={c.modules}, split {c.split}, batch {c.batch_size}{laps}{cache}"
            f"{recompute}")


def nothing_fits(p: Plan, disk: Disk) -> str:
    """The one line of a refused `--fit`: memory first, then disk."""
    if p.needed_bytes > p.budget_bytes:
        return (f"nothing fits in {fmt_bytes(p.budget_bytes)}: the smallest budget that would "
                f"fit is {fmt_bytes(p.needed_bytes)} ({p.needed_bytes} bytes), for the closest "
                f"candidate ({_describe(p.cfg)}); fix fewer options or give a larger budget")
    if disk.shared and disk.pack_bytes:
        return (f"nothing fits on disk: the closest candidate ({_describe(p.cfg)}) needs "
                f"{fmt_bytes(p.disk_bytes)} in {disk.run_dir} and the data pack "
                f"{fmt_bytes(disk.pack_bytes)} in {disk.data_dir}, one file system with "
                f"{fmt_bytes(disk.run_free)} free; give --cache-dir or --data-cache on "
                "another disk")
    return (f"nothing fits on disk: the closest candidate ({_describe(p.cfg)}) needs "
            f"{fmt_bytes(p.disk_bytes)} in {disk.run_dir}, which has "
            f"{fmt_bytes(disk.run_free)} free; give --cache-dir on a larger disk")


def format_fit(p: Plan, base: RunConfig, given: set[str], disk: Disk, written: int) -> str:
    """The plan as `train --fit` prints it: what was kept, what was chosen, the predicted
    peak per phase (`format_plan`), the disk, and the learning-rate note."""
    kept = sorted(set(given) & set(PLANNED))
    used = {"laps": p.cfg.mode == "multilap", "split": p.cfg.mode != "e2e",
            "cache_dtype": p.cfg.mode in ("sequential", "multilap")}
    chosen = [f for f in PLANNED if f not in kept and used.get(f, True)]
    shared = ", one file system with the data pack" if disk.shared and disk.pack_bytes else ""
    lines = [format_plan(p),
             f"disk        {fmt_bytes(p.disk_bytes)} at once in {disk.run_dir} "
             f"({fmt_bytes(disk.run_free)} free{shared}); {fmt_bytes(written)} written in all, "
             "the data pack included",
             "kept        " + (", ".join(f"{f}={getattr(p.cfg, f)}" for f in kept) or
                               "nothing planned was given"),
             "chosen      " + ", ".join(f"{f}={getattr(p.cfg, f)}" for f in chosen)]
    if "batch_size" not in given and p.cfg.batch_size < base.batch_size:
        lines.append(f"note        batch {p.cfg.batch_size} is below {base.batch_size}; the "
                     f"learning rate stays {p.cfg.lr:g} as given (it is not scaled)")
    return "\n".join(lines)
