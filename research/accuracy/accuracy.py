"""Accuracy benchmark: TRGL vs VanGL vs end-to-end across regimes, train sizes and seeds.

A grid (`AccuracyGrid`) names data sets with their train sizes (and the epochs used at each
size), the arms to compare (`e2e`, and `parallel` / `sequential` / `multilap` each with
transport off, VanGL, or on, TRGL), the seeds, and the `RunConfig` fields shared by every
run. `run_grid` trains every (data set, size, arm, seed) through the product path,
`edgetrain.train`, in a throw-away run directory, and rewrites the results JSON
after every run so that an interrupted grid resumes where it stopped.

What this file holds: grids and presets, running, resuming and saving a grid, the entry
point `run_benchmark` and the validation-only `tune`. The statistics (mean and Student-t
95% confidence interval over seeds), summaries, Markdown tables and plots are in
`research.accuracy.accuracy_report`.

Two accuracies are reported per cell, as in the paper:
  * `best_test_acc`: test accuracy of the depth whose *validation* accuracy is highest
    (Tables 10/11, "highest test accuracy"; the depth is never chosen on test);
  * `last_test_acc`: test accuracy of the last module (Tables 12/13, "last block").

This file does not parse argv, read the environment or tune anything on the test split.
"""
from __future__ import annotations

from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import platform
import tempfile
import time
from typing import Callable

import torch

from edgetrain import __version__
from research.accuracy.accuracy_report import markdown_report, mean_ci95, summarize, write_plots
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.regimes.schedule import train
from edgetrain.storage.atomic import atomic_write_text
from edgetrain.bench.results import write_result_json

ARMS = ("e2e", "parallel-vangl", "parallel-trgl", "sequential-vangl", "sequential-trgl",
        "multilap-vangl", "multilap-trgl")
RESULTS_VERSION = 1


@dataclass
class AccuracyGrid:
    """One benchmark grid. `datasets` maps a data set to {train size: epochs}; epochs are
    per module for sequential/multilap and in all for e2e/parallel (RunConfig's meaning)."""

    name: str
    datasets: dict[str, dict[int, int]]
    seeds: list[int]
    base: dict  # RunConfig fields shared by every run
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    data_overrides: dict[str, dict] = field(default_factory=dict)  # per data set
    arm_overrides: dict[str, dict] = field(default_factory=dict)  # e.g. {"e2e": {"lr": 0.1}}
    notes: str = ""

    def __post_init__(self) -> None:
        self.datasets = {d: {int(n): int(e) for n, e in sizes.items()}
                         for d, sizes in self.datasets.items()}
        bad = sorted(set(self.arms) - set(ARMS))
        if bad:
            raise UserError(f"unknown arms {', '.join(bad)}; choose from {', '.join(ARMS)}")
        if len(self.seeds) < 2:
            raise UserError("an accuracy grid needs at least 2 seeds for a confidence interval")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["datasets"] = {k: {str(n): e for n, e in v.items()} for k, v in self.datasets.items()}
        return d


@dataclass
class GridSet:
    """A preset made of several grids (different depths, regimes or data sets), run one
    after another, each into its own `accuracy-<part name>.json` (so each resumes on its
    own); `runner` trains one configuration (default `run_one`) and `report`, given
    {part name: results} and the output prefix, writes the combined pages."""

    name: str
    parts: list[AccuracyGrid]
    notes: str = ""
    runner: Callable[..., dict] | None = None
    report: Callable[[dict, Path, bool], list[Path]] | None = None

    def __post_init__(self) -> None:
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise UserError(f"grid set {self.name} has duplicate part names: {names}")

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for p in self.parts for d in p.datasets))


def arm_fields(arm: str) -> dict:
    """RunConfig fields of an arm: mode and transport (e2e never has transport)."""
    if arm == "e2e":
        return {"mode": "e2e", "transport": False}
    mode, kind = arm.split("-")
    return {"mode": mode, "transport": kind == "trgl"}


# --------------------------------------------------------------------------- presets
def smoke_grid(datasets: tuple[str, ...] = ("digits", "fashion-mnist")) -> AccuracyGrid:
    """Tiny grid for tests: a 2-block kmresnet of width 4, 2 seeds, one small size
    (`--data digits` keeps to the data set that is always available)."""
    sizes = {"digits": {100: 2}, "fashion-mnist": {100: 2}}
    return AccuracyGrid(
        name="smoke", datasets={d: sizes[d] for d in datasets}, seeds=[0, 1],
        base=dict(model="kmresnet", width=4, depth=2, modules=2, laps=2, batch_size=50,
                  lr=0.05, tau=1.0, augment=False),
        data_overrides={"fashion-mnist": {"val_fraction": 0.005, "test_size": 500}},
        notes="smoke test: checks plumbing, not accuracy")


def cpu_grid() -> AccuracyGrid:
    """The CPU-sized grid (well under an hour on 2 cores at one thread).

    A 4-1 K-M ResNet (kmresnet, width 8, 4 blocks, one block per module: the paper's
    block-wise setting of Appendix G, shrunk from width 256 and 10 blocks so that a run
    takes seconds on one thread). Epochs shrink as the train size grows so that every
    size sees 2,400-3,000 samples per module (150 samples would not train in 2 epochs);
    2 epochs is the floor that multilap's 2 laps need. Fashion-MNIST is scored on a fixed
    stratified 2,000-image subset of its test set (evaluation dominated a run's time), the
    depth is chosen on 600 validation images. Learning rates were chosen per regime on
    validation accuracy (fashion-mnist, 600 samples, seeds 100-101, never the grid's seeds
    or the test split), then tau per regime for TRGL at those rates (multilap takes
    sequential's values): see accuracy-cpu-tuning.json.
    """
    lr = {"e2e": 0.05, "parallel": 0.2, "sequential": 0.1, "multilap": 0.1}
    tau = {"parallel": {"tau": 1.0}, "sequential": {"tau": 10.0}, "multilap": {"tau": 10.0}}
    return AccuracyGrid(
        name="cpu",
        datasets={"fashion-mnist": {150: 16, 600: 4, 1500: 2},
                  "digits": {150: 16, 600: 4, 1294: 2}},
        seeds=[0, 1, 2, 3, 4],
        base=dict(model="kmresnet", width=8, depth=4, modules=4, laps=2, batch_size=64,
                  lr=0.05, tau=1.0, tau_schedule="midpoint", head="dgl"),
        arm_overrides={a: {"lr": lr[a.split("-")[0]], **tau.get(a.split("-")[0], {})}
                       if a.endswith("-trgl") else {"lr": lr[a.split("-")[0]]} for a in ARMS},
        data_overrides={"fashion-mnist": {"val_fraction": 0.01, "test_size": 2000}},
        notes="kmresnet width 8, depth 4, 4 modules of 1 block (a 4-1 K-M ResNet); "
              "one torch thread")


def paper_grid() -> AccuracyGrid:
    """The paper-sized grid of Appendix G (a GPU job): 10-1 K-M ResNet of width 256,
    batch 128, orthogonal init gain 0.05, weight decay 1e-4, SGD lr 0.007 for
    sequential/multilap, 0.003 parallel, 0.1 end-to-end, 10 seeds."""
    return AccuracyGrid(
        name="paper",
        datasets={"fashion-mnist": {1500: 100, 6000: 60, 30000: 40, 54000: 30}},
        seeds=list(range(10)),
        base=dict(model="kmresnet", width=256, depth=10, modules=10, laps=5, batch_size=128,
                  lr=0.007, tau=0.5, tau_schedule="midpoint", head="dgl", init_gain=0.05,
                  weight_decay=1e-4),
        arm_overrides={"e2e": {"lr": 0.1}, "parallel-vangl": {"lr": 0.003},
                       "parallel-trgl": {"lr": 0.003}},
        notes="paper-sized 10-1 K-M ResNet (Appendix G); run with --device cuda")


# --------------------------------------------------------------------------- running
@contextmanager
def torch_threads(n: int | None):
    """Set torch's intra-op thread count inside the block and restore it afterwards."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_config(grid: AccuracyGrid, dataset: str, size: int, arm: str, seed: int,
               device: str = "auto"):
    """The RunConfig of one grid point."""
    fields = {**grid.base, **arm_fields(arm), **grid.arm_overrides.get(arm, {})}
    fields.update(grid.data_overrides.get(dataset, {}))
    fields.update(data=dataset, train_size=size, epochs=grid.datasets[dataset][size],
                  seed=seed, device=device)
    return RunConfig(**fields)


def grid_points(grid: AccuracyGrid) -> list[tuple[str, int, str, int]]:
    """Every (dataset, size, arm, seed), seeds outermost so a partial grid covers all cells."""
    return [(d, n, a, s) for s in grid.seeds for d, sizes in grid.datasets.items()
            for n in sizes for a in grid.arms]


def run_one(cfg, keep_dir: Path | None = None) -> dict:
    """Train one configuration through `edgetrain.train`; returns its record."""
    t0 = time.perf_counter()
    if keep_dir is not None:
        metrics = train(cfg, keep_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="edgetrain-acc-") as tmp:
            metrics = train(cfg, Path(tmp) / "run")
    mods = metrics["modules"]
    return {"modules": [{"val_acc": m["val_acc"], "test_acc": m["test_acc"]} for m in mods],
            "best_depth": metrics["best_depth"], "best_val_acc": metrics["best_val_acc"],
            "best_test_acc": metrics["best_test_acc"], "last_test_acc": metrics["last_test_acc"],
            "train_s": metrics["timings"].get("train_s"),
            "run_s": time.perf_counter() - t0}


def cache_fields(cfg) -> dict:
    """Whether the product path streamed an activation cache for this run, and its dtype."""
    ooc = cfg.out_of_core
    return {"out_of_core": ooc, "cache_dtype": cfg.cache_dtype if ooc else None,
            "cache_views": cfg.cache_views if ooc else None}


def _key(d: str, n: int, a: str, s: int) -> str:
    return f"{d}|{n}|{a}|{s}"


def _load_previous(path: Path, grid: AccuracyGrid) -> dict[str, dict]:
    """Runs of an earlier, interrupted invocation that are points of `grid` with the same
    configuration (same shared fields and the same epochs at their size); empty otherwise."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; move it away or pass --fresh") from None
    if not isinstance(old, dict) or not _same_settings(old.get("grid"), grid.to_dict()):
        raise UserError(f"{path} holds results of a different grid; move it away or pass --fresh")
    points = {_key(*p) for p in grid_points(grid)}
    return {k: r for r in old.get("runs", [])
            if (k := _key(r["dataset"], r["train_size"], r["arm"], r["seed"])) in points
            and r["epochs"] == grid.datasets[r["dataset"]][r["train_size"]]}


def _same_settings(old: dict | None, new: dict) -> bool:
    """Same grid up to which sizes, arms and seeds it holds."""
    skip = {"datasets", "arms", "seeds"}
    return isinstance(old, dict) and all(old.get(k) == v for k, v in new.items() if k not in skip)


def run_grid(grid: AccuracyGrid, json_path: Path, *, device: str = "auto",
             threads: int | None = 1, resume: bool = True,
             log: Callable[[str], None] | None = None,
             runner: Callable[..., dict] | None = None) -> dict:
    """Train every point of `grid`, rewriting `json_path` after each run; returns the results.

    Args:
        grid: what to run.
        json_path: results file; with `resume`, runs it already holds are not repeated.
        device: RunConfig.device of every run.
        threads: torch intra-op threads while training (None leaves torch's setting).
        resume: reuse the runs of an interrupted invocation of the same grid.
        log: called with one line per finished run.
        runner: trains one RunConfig and returns its record (default `run_one`; the
            `paper-cpu` preset passes one that also records training curves).

    Raises:
        UserError: a data set that cannot be loaded, a results file of another grid.
    """
    runner = runner or run_one
    json_path = Path(json_path)
    done = _load_previous(json_path, grid) if resume else {}
    res = _header(grid, device, threads)
    res["runs"], res["resumed_runs"] = list(done.values()), len(done)
    t0 = time.perf_counter() - sum(r.get("run_s", 0.0) for r in done.values())
    with torch_threads(threads):
        for d, n, a, s in grid_points(grid):
            if _key(d, n, a, s) in done:
                continue
            cfg = run_config(grid, d, n, a, s, device)
            rec = {"dataset": d, "train_size": n, "arm": a, "seed": s, "epochs": cfg.epochs,
                   **cache_fields(cfg), **runner(cfg)}
            res["runs"].append(rec)
            res["wall_s"] = time.perf_counter() - t0
            _save(json_path, res)
            if log:
                log(f"{d} n={n} {a} seed={s}: best {rec['best_test_acc']:.4f} "
                    f"(depth {rec['best_depth']}) last {rec['last_test_acc']:.4f} "
                    f"{rec['run_s']:.1f}s [{len(res['runs'])}/{len(grid_points(grid))}]")
    res["complete"] = True
    res["loadavg_end"] = _loadavg()
    res["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _save(json_path, res)
    return res


def _header(grid: AccuracyGrid, device: str, threads: int | None) -> dict:

    return {"benchmark": "accuracy", "results_version": RESULTS_VERSION,
            "edgetrain_version": __version__, "torch_version": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "device": device, "threads": threads, "grid": grid.to_dict(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_start": _loadavg(), "complete": False, "wall_s": 0.0, "runs": []}


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages (other processes share the cores: timings are noisy)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _save(path: Path, res: dict) -> None:
    res["cells"] = summarize(res["runs"])
    write_result_json(path, res)


# --------------------------------------------------------------------------- entry point
def run_benchmark(grid: AccuracyGrid | GridSet, out_dir: Path, *, device: str = "auto",
                  threads: int | None = 1, resume: bool = True, plots: bool = True,
                  log: Callable[[str], None] | None = None) -> dict:
    """Run `grid` and write `out_dir/accuracy-<name>.json`, `.md` and the PNG plots.

    A `GridSet` runs its parts in order, each into `accuracy-<part>.json` with its own
    pages, and has its `report` rewrite the combined pages after every part (and once
    more at the end), so a set that is stopped half way still has its pages.

    Returns:
        {"results": the results dict ({part: results} for a GridSet), "paths": the files
        written}.
    Raises:
        UserError: see `run_grid`; an unwritable `out_dir`.
    """
    if isinstance(grid, GridSet):
        return _run_set(grid, out_dir, device=device, threads=threads, resume=resume,
                        plots=plots, log=log)
    return _run_single(grid, out_dir, device=device, threads=threads, resume=resume,
                       plots=plots, log=log)


def _run_set(gs: GridSet, out_dir: Path, **kw) -> dict:
    results, paths = {}, []
    for part in gs.parts:
        out = _run_single(part, out_dir, runner=gs.runner, **kw)
        results[part.name] = out["results"]
        paths += out["paths"]
        if gs.report:
            paths += gs.report(results, Path(out_dir) / f"accuracy-{gs.name}", kw["plots"])
    return {"results": results, "paths": list(dict.fromkeys(paths))}


def _run_single(grid: AccuracyGrid, out_dir: Path, *, device: str = "auto",
                threads: int | None = 1, resume: bool = True, plots: bool = True,
                log: Callable[[str], None] | None = None,
                runner: Callable[..., dict] | None = None) -> dict:
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 0 (0: torch's default; got {threads})")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror or e}") from None
    prefix = out_dir / f"accuracy-{grid.name}"
    json_path = Path(f"{prefix}.json")
    res = run_grid(grid, json_path, device=device, threads=threads, resume=resume, log=log,
                   runner=runner)
    return {"results": res, "paths": [json_path] + write_reports(res, prefix, plots)}


def write_reports(res: dict, prefix: Path, plots: bool = True) -> list[Path]:
    """Markdown page (and plots) for a results dict, next to its JSON."""
    md = Path(f"{prefix}.md")
    atomic_write_text(md, markdown_report(res))
    return [md] + (write_plots(res, prefix) if plots else [])


# --------------------------------------------------------------------------- tuning
def tune(grid: AccuracyGrid, dataset: str, size: int, sweeps: dict[str, dict[str, list]],
         seeds: list[int], *, device: str = "auto", threads: int | None = 1,
         log: Callable[[str], None] | None = None) -> dict:
    """Validation-only sweep: for each arm in `sweeps` ({arm: {field: values}}), train every
    value (one field at a time, the others from the grid) and record the best-depth
    *validation* accuracy. Test accuracies are not recorded, so nothing is chosen on test.

    Returns:
        {"dataset", "size", "seeds", "results": [{arm, field, value, best_val_acc}],
         "best": {arm: {field: value}}}.
    """
    out, best = [], {}
    with torch_threads(threads):
        for arm, fields in sweeps.items():
            for name, values in fields.items():
                scores = []
                for v in values:
                    g = dataclasses.replace(grid, arm_overrides={
                        **grid.arm_overrides, arm: {**grid.arm_overrides.get(arm, {}), name: v}})
                    vals = [run_one(run_config(g, dataset, size, arm, s, device))["best_val_acc"]
                            for s in seeds]
                    stat = mean_ci95(vals)
                    out.append({"arm": arm, "field": name, "value": v, "best_val_acc": stat})
                    scores.append((stat["mean"], v))
                    if log:
                        log(f"tune {dataset} n={size} {arm} {name}={v}: val {stat['mean']:.4f}")
                best.setdefault(arm, {})[name] = max(scores, key=lambda t: t[0])[1]
    return {"dataset": dataset, "size": size, "seeds": seeds, "results": out, "best": best}
