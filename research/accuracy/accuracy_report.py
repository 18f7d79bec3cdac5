"""Accuracy benchmark report: statistics, summaries, Markdown and plots.

What this file holds: `mean_ci95` (mean and half-width of the two-sided Student-t 95%
confidence interval over seeds, the t quantile from `scipy.stats.t.ppf`); `summarize`,
which turns the runs of `research.accuracy.accuracy.run_grid` into cells (one per data set,
train size and arm); the paired differences behind the paper's claims (`claim_checks`);
`markdown_table` / `markdown_report`; and `write_plots` (PNG, needs matplotlib).

It reads results dicts only: grids, running and saving are in `research.accuracy.accuracy`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
import statistics

from edgetrain.plots.run_plots import pyplot


# --------------------------------------------------------------------------- statistics
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
    from scipy.stats import t
    std = statistics.stdev(values)
    return {"mean": mean, "ci95": float(t.ppf(0.975, n - 1)) * std / math.sqrt(n), "n": n,
            "std": std}


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
    plt = pyplot()
    prefix = Path(prefix)
    cells = {(c["dataset"], c["train_size"], c["arm"]): c for c in res["cells"]}
    paths = []
    for d, sizes in res["grid"]["datasets"].items():
        if not _regimes(res["grid"]["arms"]):  # e2e alone: no per-module curves to draw
            break
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
