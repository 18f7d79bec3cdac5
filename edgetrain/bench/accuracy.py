"""Accuracy benchmark: TRGL vs VanGL vs end-to-end across regimes, train sizes and seeds.

A grid (`AccuracyGrid`) names data sets with their train sizes (and the epochs used at each
size), the arms to compare (`e2e`, and `parallel` / `sequential` / `multilap` each with
transport off, VanGL, or on, TRGL), the seeds, and the `RunConfig` fields shared by every
run. `run_grid` trains every (data set, size, arm, seed) through the product path,
`edgetrain.schedule.train`, in a throw-away run directory, and rewrites the results JSON
after every run so that an interrupted grid resumes where it stopped. `summarize` turns
runs into cells (mean and Student-t 95% confidence interval over seeds), `markdown_table`
and `write_plots` render them.

Two accuracies are reported per cell, as in the paper:
  * `best_test_acc`: test accuracy of the depth whose *validation* accuracy is highest
    (Tables 10/11, "highest test accuracy"; the depth is never chosen on test);
  * `last_test_acc`: test accuracy of the last module (Tables 12/13, "last block").

This file does not parse argv, read the environment or tune anything on the test split.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgetrain.errors import UserError

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


PRESETS: dict[str, Callable[[], AccuracyGrid]] = {
    "smoke": smoke_grid, "cpu": cpu_grid, "paper": paper_grid}


def preset(name: str) -> AccuracyGrid:
    """The named grid (smoke, cpu, paper).

    Raises:
        UserError: unknown preset name.
    """
    if name not in PRESETS:
        raise UserError(f"unknown accuracy preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()


def narrow_grid(name: str, datasets: list[str] | None = None,
                n_seeds: int | None = None) -> AccuracyGrid:
    """Preset `name`, restricted to `datasets` and to its first `n_seeds` seeds (or more).

    Raises:
        UserError: unknown preset, a data set the preset does not hold, fewer than 2 seeds.
    """
    grid = preset(name)
    if datasets:
        bad = sorted(set(datasets) - set(grid.datasets))
        if bad:
            raise UserError(f"preset {name} has no data set {', '.join(bad)} "
                            f"(it has {', '.join(grid.datasets)})")
        grid.datasets = {d: s for d, s in grid.datasets.items() if d in datasets}
    if n_seeds is not None:
        if n_seeds < 2:
            raise UserError(f"--seeds must be >= 2 for a confidence interval (got {n_seeds})")
        grid.seeds = list(range(n_seeds))
    return grid


# --------------------------------------------------------------------------- statistics
@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom (p in (0.5, 1)).

    Newton's method on the CDF, itself integrated from the density with Simpson's rule:
    agrees with scipy to ~1e-10 without needing scipy.
    """
    x = 2.0
    for _ in range(100):
        step = (_t_cdf(x, df) - p) / _t_pdf(x, df)
        x = max(x - step, 0.5 * x)  # never jump below 0 on the heavy-tailed df = 1
        if abs(step) < 1e-12:
            break
    return x


def _t_pdf(t: float, df: int) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1.0 + t * t / df) ** (-(df + 1) / 2)


def _t_cdf(x: float, df: int, steps: int = 2000) -> float:
    """P(T <= x) for x >= 0, by Simpson's rule on the density over [0, x]."""
    h = x / steps
    inner = sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, steps))
    return 0.5 + (_t_pdf(0.0, df) + _t_pdf(x, df) + inner) * h / 3.0


def mean_ci95(values: list[float]) -> dict:
    """Mean and half-width of the two-sided 95% Student-t confidence interval.

    Returns:
        {"mean", "ci95", "n", "std"}; ci95 is None for fewer than 2 values.
    """
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0, "std": None}
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "ci95": None, "n": 1, "std": None}
    std = statistics.stdev(values)
    return {"mean": mean, "ci95": t_quantile(0.975, n - 1) * std / math.sqrt(n), "n": n,
            "std": std}


# --------------------------------------------------------------------------- running
@contextmanager
def torch_threads(n: int | None):
    """Set torch's intra-op thread count inside the block and restore it afterwards."""
    import torch
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
    from edgetrain.config import RunConfig
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
    """Train one configuration through `edgetrain.schedule.train`; returns its record."""
    from edgetrain.schedule import train
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
    from edgetrain import schedule
    ooc = bool(getattr(schedule, "out_of_core", lambda c: False)(cfg))
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
             log: Callable[[str], None] | None = None) -> dict:
    """Train every point of `grid`, rewriting `json_path` after each run; returns the results.

    Args:
        grid: what to run.
        json_path: results file; with `resume`, runs it already holds are not repeated.
        device: RunConfig.device of every run.
        threads: torch intra-op threads while training (None leaves torch's setting).
        resume: reuse the runs of an interrupted invocation of the same grid.
        log: called with one line per finished run.

    Raises:
        UserError: a data set that cannot be loaded, a results file of another grid.
    """
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
                   **cache_fields(cfg), **run_one(cfg)}
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
    import torch
    from edgetrain import __version__
    return {"benchmark": "accuracy", "results_version": RESULTS_VERSION,
            "edgetrain_version": __version__, "torch_version": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "device": device, "threads": threads, "grid": grid.to_dict(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_start": _loadavg(), "complete": False, "wall_s": 0.0, "runs": []}


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages (other processes share the cores: timings are noisy)."""
    import os
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _save(path: Path, res: dict) -> None:
    from edgetrain.store import atomic_write_json
    res["cells"] = summarize(res["runs"])
    atomic_write_json(path, res)


# --------------------------------------------------------------------------- summaries
def summarize(runs: list[dict]) -> list[dict]:
    """One cell per (dataset, size, arm): mean and 95% CI over seeds of the best-depth and
    last-module test accuracies, per-module test accuracy, and the chosen depths."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["train_size"], r["arm"]), []).append(r)
    cells = []
    for (d, n, a), rs in groups.items():
        depth = max(len(r["modules"]) for r in rs)
        per_module = [mean_ci95([r["modules"][k]["test_acc"] for r in rs
                                 if len(r["modules"]) > k]) for k in range(depth)]
        cells.append({"dataset": d, "train_size": n, "arm": a, "n_seeds": len(rs),
                      "seeds": sorted(r["seed"] for r in rs),
                      "best_test_acc": mean_ci95([r["best_test_acc"] for r in rs]),
                      "last_test_acc": mean_ci95([r["last_test_acc"] for r in rs]),
                      "best_val_acc": mean_ci95([r["best_val_acc"] for r in rs]),
                      "best_depths": [r["best_depth"] for r in rs],
                      "per_module_test_acc": per_module,
                      "run_s": mean_ci95([r["run_s"] for r in rs])})
    return cells


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    ci = "" if stat["ci95"] is None else f" ± {100 * stat['ci95']:.2f}"
    return f"{100 * stat['mean']:.2f}{ci}"


def markdown_table(res: dict, metric: str = "best_test_acc") -> str:
    """Markdown table, one row per (dataset, size) and one column per arm: test accuracy
    in percent, mean ± half-width of the 95% Student-t interval over seeds."""
    grid = res["grid"]
    cells = {(c["dataset"], c["train_size"], c["arm"]): c for c in res["cells"]}
    arms = grid["arms"]
    lines = ["| data set | train size | " + " | ".join(arms) + " |",
             "|---|---:|" + "---:|" * len(arms)]
    for d, sizes in grid["datasets"].items():
        for n in sorted(int(k) for k in sizes):
            row = [_fmt(cells[(d, n, a)][metric]) if (d, n, a) in cells else "—" for a in arms]
            lines.append(f"| {d} | {n} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_report(res: dict) -> str:
    """The Markdown page: configuration, both tables (best depth and last module), timing."""
    g = res["grid"]
    n_runs, n_all = len(res["runs"]), _n_points(g)
    head = [f"# Accuracy benchmark `{g['name']}`", "",
            f"{g['notes']}. Base configuration: `{json.dumps(g['base'], sort_keys=True)}`; "
            f"per-arm overrides: `{json.dumps(g['arm_overrides'], sort_keys=True)}`; "
            f"epochs per train size: `{json.dumps(g['datasets'], sort_keys=True)}`; "
            f"seeds {g['seeds']}.", "",
            f"Runs: {n_runs}/{n_all} ({'complete' if res['complete'] else 'PARTIAL'}), "
            f"wall time {res['wall_s'] / 60:.1f} min (sum of the runs' times){_load_note(res)}, "
            f"torch {res['torch_version']}, "
            f"threads {res['threads']}, device {res['device']}; sequential/multilap through "
            f"the out-of-core activation cache: {_cache_note(res['runs'])}.", "",
            "Cells: test accuracy in %, mean ± half-width of the two-sided 95% Student-t "
            "confidence interval over seeds (t quantile with n-1 degrees of freedom).", ""]
    best = ["## Best depth (depth chosen on validation; Tables 10/11 style)", "",
            markdown_table(res, "best_test_acc"), ""]
    last = ["## Last module (Tables 12/13 style)", "", markdown_table(res, "last_test_acc"), ""]
    return "\n".join(head + best + last + claims_markdown(claim_checks(res["runs"])))


def _load_note(res: dict) -> str:
    if not res.get("loadavg_start"):
        return ""
    return (f", load average {res['loadavg_start'][0]} at the start and "
            f"{(res.get('loadavg_end') or ['?'])[0]} at the end (other jobs shared the cores)")


def _cache_note(runs: list[dict]) -> str:
    seq = [r for r in runs if r["arm"].split("-")[0] in ("sequential", "multilap")]
    ooc = {(r.get("out_of_core"), r.get("cache_dtype"), r.get("cache_views")) for r in seq}
    return "; ".join(f"out_of_core={o}, cache dtype {d}, views {v}" for o, d, v in sorted(
        ooc, key=str)) or "no sequential runs"


def _n_points(g: dict) -> int:
    return sum(len(s) for s in g["datasets"].values()) * len(g["arms"]) * len(g["seeds"])


# --------------------------------------------------------------------------- plots
ARM_STYLE = {"vangl": ("tab:blue", "VanGL"), "trgl": ("tab:red", "TRGL")}


def write_plots(res: dict, prefix: Path) -> list[Path]:
    """PNG plots: per data set, test accuracy after each module (Figures 2-3 style, one
    panel per regime and size), and best-depth test accuracy against train size.

    Raises:
        UserError: matplotlib missing (install the `plots` extra).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'edgetrain[plots]'") from None
    prefix = Path(prefix)
    cells = {(c["dataset"], c["train_size"], c["arm"]): c for c in res["cells"]}
    paths = []
    for d, sizes in res["grid"]["datasets"].items():
        paths.append(_plot_modules(plt, cells, d, sorted(int(n) for n in sizes),
                                   res["grid"]["arms"], Path(f"{prefix}-modules-{d}.png")))
    paths.append(_plot_sizes(plt, cells, res["grid"], Path(f"{prefix}-size.png")))
    return paths


def _regimes(arms: list[str]) -> list[str]:
    return [m for m in ("parallel", "sequential", "multilap")
            if any(a.startswith(m) for a in arms)]


def _plot_modules(plt, cells: dict, d: str, sizes: list[int], arms: list[str], path: Path) -> Path:
    regimes = _regimes(arms)
    fig, axes = plt.subplots(len(regimes), len(sizes), squeeze=False,
                             figsize=(3.2 * len(sizes), 2.6 * len(regimes)))
    for i, mode in enumerate(regimes):
        for j, n in enumerate(sizes):
            ax = axes[i][j]
            for kind, (color, label) in ARM_STYLE.items():
                c = cells.get((d, n, f"{mode}-{kind}"))
                if c:
                    _curve(ax, c["per_module_test_acc"], color, label)
            e2e = cells.get((d, n, "e2e"))
            if e2e and e2e["last_test_acc"]["mean"] is not None:
                ax.axhline(100 * e2e["last_test_acc"]["mean"], color="gray", ls="--", label="E2E")
            ax.set_title(f"{mode}, n={n}", fontsize=9)
            ax.set_xlabel("module", fontsize=8)
            ax.set_ylabel("test acc (%)", fontsize=8)
            ax.tick_params(labelsize=7)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{d}: test accuracy after each module (mean, 95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curve(ax, stats: list[dict], color: str, label: str) -> None:
    xs = list(range(1, len(stats) + 1))
    mean = [100 * s["mean"] for s in stats]
    ci = [100 * (s["ci95"] or 0.0) for s in stats]
    ax.plot(xs, mean, "-o", color=color, ms=3, label=label)
    ax.fill_between(xs, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)],
                    color=color, alpha=0.2)
    ax.set_xticks(xs)


def _plot_sizes(plt, cells: dict, grid: dict, path: Path) -> Path:
    ds = list(grid["datasets"])
    fig, axes = plt.subplots(1, len(ds), squeeze=False, figsize=(5.0 * len(ds), 3.8))
    for ax, d in zip(axes[0], ds):
        sizes = sorted(int(n) for n in grid["datasets"][d])
        for i, a in enumerate(grid["arms"]):
            pts = [(n, cells[(d, n, a)]["best_test_acc"]) for n in sizes if (d, n, a) in cells]
            if not pts:
                continue
            dodge = 1.0 + 0.025 * (i - (len(grid["arms"]) - 1) / 2)  # keep error bars apart
            ax.errorbar([p[0] * dodge for p in pts], [100 * p[1]["mean"] for p in pts],
                        yerr=[100 * (p[1]["ci95"] or 0.0) for p in pts], capsize=3,
                        marker="o", ms=3, ls=_ls(a), color=_color(a), label=a)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("train size")
        ax.set_ylabel("best-depth test acc (%)")
        ax.set_title(d)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _color(arm: str) -> str:
    return {"e2e": "black", "parallel": "tab:green", "sequential": "tab:orange",
            "multilap": "tab:purple"}[arm.split("-")[0]]


def _ls(arm: str) -> str:
    return "--" if arm.endswith("vangl") else "-"


# --------------------------------------------------------------------------- entry point
def run_benchmark(grid: AccuracyGrid, out_dir: Path, *, device: str = "auto",
                  threads: int | None = 1, resume: bool = True, plots: bool = True,
                  log: Callable[[str], None] | None = None) -> dict:
    """Run `grid` and write `out_dir/accuracy-<name>.json`, `.md` and the PNG plots.

    Returns:
        {"results": the results dict, "paths": the files written}.
    Raises:
        UserError: see `run_grid`; an unwritable `out_dir`.
    """
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 0 (0: torch's default; got {threads})")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir}: {e.strerror or e}") from None
    prefix = out_dir / f"accuracy-{grid.name}"
    json_path = Path(f"{prefix}.json")
    res = run_grid(grid, json_path, device=device, threads=threads, resume=resume, log=log)
    return {"results": res, "paths": [json_path] + write_reports(res, prefix, plots)}


def write_reports(res: dict, prefix: Path, plots: bool = True) -> list[Path]:
    """Markdown page (and plots) for a results dict, next to its JSON."""
    from edgetrain.store import atomic_write_text
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


# --------------------------------------------------------------------------- paper claims
def _paired(runs: list[dict], d: str, n: int, arm_a: str, arm_b: str, metric: str) -> dict:
    """mean_ci95 of metric(arm_a) - metric(arm_b) over the seeds both arms ran (same seed:
    same data subset, validation split and initial weights)."""
    by = {(r["arm"], r["seed"]): r[metric] for r in runs
          if r["dataset"] == d and r["train_size"] == n}
    seeds = sorted({s for a, s in by if a == arm_a} & {s for a, s in by if a == arm_b})
    return mean_ci95([by[(arm_a, s)] - by[(arm_b, s)] for s in seeds])


def claim_checks(runs: list[dict]) -> list[dict]:
    """Per (dataset, size, regime): paired TRGL - VanGL and multilap - sequential differences
    (best depth and last module), and each module-wise arm's drop from its best module to
    its last module (mean test accuracy over seeds; a collapse with depth shows as a drop)."""
    out = []
    for d, n in sorted({(r["dataset"], r["train_size"]) for r in runs}):
        row = {"dataset": d, "train_size": n}
        for mode in ("parallel", "sequential", "multilap"):
            for metric in ("best_test_acc", "last_test_acc"):
                row[f"{mode}_trgl_minus_vangl_{metric}"] = _paired(
                    runs, d, n, f"{mode}-trgl", f"{mode}-vangl", metric)
        for kind in ("vangl", "trgl"):
            row[f"multilap_minus_sequential_{kind}_best_test_acc"] = _paired(
                runs, d, n, f"multilap-{kind}", f"sequential-{kind}", "best_test_acc")
            for mode in ("parallel", "sequential", "multilap"):
                row[f"{mode}_{kind}_drop_best_to_last_module"] = _module_drop(
                    runs, d, n, f"{mode}-{kind}")
        out.append(row)
    return out


def _module_drop(runs: list[dict], d: str, n: int, arm: str) -> float | None:
    rs = [r for r in runs if (r["dataset"], r["train_size"], r["arm"]) == (d, n, arm)]
    if not rs:
        return None
    k = len(rs[0]["modules"])
    means = [statistics.fmean(r["modules"][i]["test_acc"] for r in rs) for i in range(k)]
    return max(means) - means[-1]


def claims_markdown(checks: list[dict]) -> list[str]:
    """Section of the report: the paired differences behind the paper's claims."""
    lines = ["## Paper claims: paired differences over seeds (percentage points, 95% CI)", "",
             "TRGL - VanGL uses the best-depth test accuracy; ML - Seq compares multilap with "
             "sequential; drop = best module's mean test accuracy minus the last module's "
             "(a collapse with depth shows as a large drop).", "",
             "| data set | size | Par TRGL-VanGL | Seq TRGL-VanGL | ML TRGL-VanGL "
             "| ML-Seq VanGL | ML-Seq TRGL | drop Par V/T | drop Seq V/T | drop ML V/T |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in checks:
        cols = [_pp(c[f"{m}_trgl_minus_vangl_best_test_acc"]) for m in
                ("parallel", "sequential", "multilap")]
        cols += [_pp(c[f"multilap_minus_sequential_{k}_best_test_acc"]) for k in ("vangl", "trgl")]
        cols += [f"{_drop(c[f'{m}_vangl_drop_best_to_last_module'])} / "
                 f"{_drop(c[f'{m}_trgl_drop_best_to_last_module'])}"
                 for m in ("parallel", "sequential", "multilap")]
        lines.append(f"| {c['dataset']} | {c['train_size']} | " + " | ".join(cols) + " |")
    return lines + [""]


def _pp(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    ci = "" if stat["ci95"] is None else f" ± {100 * stat['ci95']:.2f}"
    return f"{100 * stat['mean']:+.2f}{ci}"


def _drop(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"
