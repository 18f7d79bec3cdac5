"""Combined report of the `paper-cpu` preset: our tables beside the paper's, the paired
differences behind each claim with a plain-words verdict, and the figures.

What this file holds: `paper_cpu_gridset` (the preset's parts with this report attached),
`write_paper_report` (accuracy-paper-cpu.{json,md,png} and
accuracy-paper-cpu-curves.png, from the parts' results, in memory or on disk),
`claim_rows` (the verdicts) and `write_tuning_report` (the validation sweeps of lr and tau,
accuracy-paper-cpu-tuning.{json,md} and the Figure 4 analogue
accuracy-paper-cpu-tau-sweep.png). It reads results dicts only; running is in
`research.accuracy.accuracy` and `research.paper_cpu.paper_cpu`.

Verdicts, for a claim "A > B" measured as the paired difference A - B over seeds (same
seed: same training subset, validation split and initial weights): *shown* when the whole
95% Student-t interval is above 0, *contradicted* when it is below 0, *not shown* when it
contains 0.
"""
from __future__ import annotations

import json
from pathlib import Path
import statistics

from research.accuracy.accuracy import GridSet
from research.accuracy.accuracy_report import mean_ci95
from research.paper_cpu.paper_cpu import PAPER, paper_cpu_parts, run_traced
from edgetrain.storage.atomic import atomic_write_text
from edgetrain.bench.results import write_result_json

COLORS = {"vangl": "tab:blue", "trgl": "tab:red"}
LINES = {"parallel": "-", "sequential": "--", "multilap": "-"}


def paper_cpu_gridset(tuned: dict | None = None) -> GridSet:
    """The `paper-cpu` preset: its parts (`research.paper_cpu.paper_cpu.paper_cpu_parts`),
    trained by `run_traced`, reported by `write_paper_report`. `tuned` ({part: {arm:
    {lr, tau}}}) overrides the preset's `TUNED` values (the driver script
    research/paper_cpu/run.py passes the values its tuning just chose)."""
    return GridSet(name="paper-cpu", parts=paper_cpu_parts(tuned), runner=run_traced,
                   report=write_paper_report,
                   notes="the paper's Tables 13 and 12 at CPU scale (research.paper_cpu.paper_cpu)")


# --------------------------------------------------------------------------- statistics
def paired(runs: list[dict], n: int, arm_a: str, arm_b: str, metric) -> dict:
    """mean_ci95 over the common seeds of metric(run of arm_a) - metric(run of arm_b) at
    train size n; `metric` is a key of the run record or a function of it."""
    get = metric if callable(metric) else (lambda r: r[metric])
    by = {(r["arm"], r["seed"]): get(r) for r in runs if r["train_size"] == n}
    seeds = sorted({s for a, s in by if a == arm_a} & {s for a, s in by if a == arm_b})
    return mean_ci95([by[(arm_a, s)] - by[(arm_b, s)] for s in seeds])


def drop(r: dict) -> float:
    """Best depth's test accuracy (depth chosen on validation) minus the last module's:
    how much a run loses by going to its last module."""
    return r["best_test_acc"] - r["last_test_acc"]


def verdict(stat: dict) -> str:
    if stat["mean"] is None or stat["ci95"] is None:
        return "not measured"
    lo, hi = stat["mean"] - stat["ci95"], stat["mean"] + stat["ci95"]
    return "shown" if lo > 0 else "contradicted" if hi < 0 else "not shown (CI contains 0)"


def claim_rows(name: str, res: dict) -> list[dict]:
    """The paper's claims checked on one part: per train size, TRGL > VanGL (last block and
    best depth), TRGL - e2e, VanGL degrades after its best module, TRGL degrades less."""
    runs, out = res["runs"], []
    modes = [m for m in ("parallel", "sequential", "multilap")
             if f"{m}-trgl" in res["grid"]["arms"]]
    for n in sorted({r["train_size"] for r in runs}):
        for m in modes:
            v, t = f"{m}-vangl", f"{m}-trgl"
            checks = [
                (f"{m} TRGL > VanGL, last block", paired(runs, n, t, v, "last_test_acc")),
                (f"{m} TRGL > VanGL, best depth", paired(runs, n, t, v, "best_test_acc")),
                (f"{m} TRGL >= e2e, last block (paper: about equal)",
                 paired(runs, n, t, "e2e", "last_test_acc")),
                (f"{m} VanGL degrades after its best module (best - last > 0)",
                 _single(runs, n, v)),
                (f"{m} TRGL degrades less than VanGL (VanGL drop - TRGL drop > 0)",
                 paired(runs, n, v, t, drop)),
            ]
            out += [{"part": name, "train_size": n, "claim": c, "diff": s, "verdict": verdict(s)}
                    for c, s in checks]
    return out


def same_lr_claims(parts: dict[str, dict], out_dir: Path) -> list[dict]:
    """t13-digits was tuned per arm (VanGL lr 0.05, TRGL 0.02); the investigation's
    `investigate-vangl-lr` reran VanGL at TRGL's lr: TRGL > VanGL at the same lr."""
    path = Path(out_dir) / "accuracy-investigate-vangl-lr.json"
    t13 = parts.get("paper-cpu-t13-digits")
    if t13 is None or not path.is_file():
        return []
    van = [dict(r, arm="vangl-same-lr") for r in json.loads(path.read_text())["runs"]]
    runs = t13["runs"] + van
    out = []
    for n in sorted({r["train_size"] for r in van}):
        for metric in ("last_test_acc", "best_test_acc"):
            s = paired(runs, n, "parallel-trgl", "vangl-same-lr", metric)
            out.append({"part": "paper-cpu-t13-digits", "train_size": n,
                        "claim": f"parallel TRGL > VanGL at TRGL's lr (investigate-vangl-lr), "
                                 f"{'last block' if metric == 'last_test_acc' else 'best depth'}",
                        "diff": s, "verdict": verdict(s)})
    return out


def pooled_claims(parts: dict[str, dict], out_dir: Path) -> list[dict]:
    """TRGL > VanGL and "TRGL degrades less", pooled over every (part, size, regime) at the
    same lr: the per-seed paired differences of all cells in one interval (t13-digits,
    tuned at different lrs, enters with `investigate-vangl-lr`'s VanGL). A descriptive
    summary: the cells differ in variance, so the interval is approximate."""
    path = Path(out_dir) / "accuracy-investigate-vangl-lr.json"
    same = json.loads(path.read_text())["runs"] if path.is_file() else None
    last, drops = [], []
    for name, res in parts.items():
        for m in ("parallel", "sequential", "multilap"):
            t = [r for r in res["runs"] if r["arm"] == f"{m}-trgl"]
            v = [r for r in res["runs"] if r["arm"] == f"{m}-vangl"]
            if not t or not v:
                continue
            ov = res["grid"]["arm_overrides"]
            if ov.get(f"{m}-trgl", {}).get("lr") != ov.get(f"{m}-vangl", {}).get("lr"):
                if name != "paper-cpu-t13-digits" or same is None:
                    continue  # tuned at different lrs and no same-lr rerun: left out
                v = same
            vb = {(r["train_size"], r["seed"]): r for r in v}
            for r in t:
                w = vb.get((r["train_size"], r["seed"]))
                if w is not None:
                    last.append(r["last_test_acc"] - w["last_test_acc"])
                    drops.append(drop(w) - drop(r))
    if not last:
        return []
    out = []
    for claim, vals in (("TRGL > VanGL, last block, pooled over every cell at the same lr", last),
                        ("TRGL degrades less than VanGL, pooled over every cell at the same lr",
                         drops)):
        s = mean_ci95(vals)
        out.append({"part": "all", "train_size": "all", "claim": claim, "diff": s,
                    "verdict": verdict(s)})
    return out


def _single(runs: list[dict], n: int, arm: str) -> dict:
    return mean_ci95([drop(r) for r in runs if r["train_size"] == n and r["arm"] == arm])


# --------------------------------------------------------------------------- the pages
def load_parts(results: dict, out_dir: Path) -> dict[str, dict]:
    """Every part's results: from `results` when there, else from its JSON on disk."""
    parts = {}
    for g in paper_cpu_parts():
        if g.name in results:
            parts[g.name] = results[g.name]
        elif (p := Path(out_dir) / f"accuracy-{g.name}.json").is_file():
            parts[g.name] = json.loads(p.read_text())
    return parts


def write_paper_report(results: dict, prefix: Path, plots: bool = True) -> list[Path]:
    """accuracy-paper-cpu.{json,md} (and .png, -curves.png) from the parts run so far."""
    prefix = Path(prefix)
    parts = load_parts(results, prefix.parent)
    claims = [c for name, res in parts.items() for c in claim_rows(name, res)]
    claims += same_lr_claims(parts, prefix.parent)
    claims += pooled_claims(parts, prefix.parent)
    summary = {"preset": "paper-cpu", "paper": _paper_json(),
               "parts": {n: {"grid": r["grid"], "cells": r["cells"], "complete": r["complete"],
                             "n_runs": len(r["runs"]), "wall_s": r["wall_s"]}
                         for n, r in parts.items()},
               "claims": claims}
    write_result_json(Path(f"{prefix}.json"), summary)
    atomic_write_text(Path(f"{prefix}.md"), markdown(parts, claims))
    paths = [Path(f"{prefix}.json"), Path(f"{prefix}.md")]
    if plots and parts:
        paths += [plot_modules(parts, Path(f"{prefix}.png")),
                  plot_curves(parts, Path(f"{prefix}-curves.png"))]
    return paths


def _paper_json() -> dict:
    return {t: {"table": v["table"], "rows": {str(n): {a: {"mean": m, "ci95": c}
                                                        for a, (m, c) in row.items()}
                                               for n, row in v["rows"].items()}}
            for t, v in PAPER.items()}


def fmt_stat(stat: dict, scale: float = 100.0, sign: str = "") -> str:
    """A mean_ci95 dict as "mean ± ci95" in percent (or `scale`); "—" without a mean."""
    if stat["mean"] is None:
        return "—"
    ci = "" if stat["ci95"] is None else f" ± {scale * stat['ci95']:.2f}"
    return f"{scale * stat['mean']:{sign}.2f}{ci}"


def markdown(parts: dict[str, dict], claims: list[dict]) -> str:
    lines = ["# Accuracy preset `paper-cpu`: the paper's Tables 13 and 12 at CPU scale", "",
             "Test accuracy in %, mean ± half-width of the 95% Student-t interval over seeds; "
             "`last` is the last module (the tables' metric), `best` the depth chosen on "
             "validation. Paper numbers are last-block accuracies from Appendix G (their data "
             "set and scale, not ours). Settings, compute matching and tuning: "
             "`research.paper_cpu.paper_cpu`; the lr / tau sweeps: accuracy-paper-cpu-tuning.md.",
             ""]
    lines += verdict_matrix(claims)
    for name, res in parts.items():
        lines += _part_section(name, res)
    lines += ["## Claims: paired differences over seeds (percentage points, 95% CI)", "",
              "Shown: the whole interval above 0; contradicted: below 0; not shown: it "
              "contains 0. The intervals are per claim, not corrected for the number of "
              "claims: at 95%, about one claim in twenty comes out shown or contradicted by "
              "chance alone, so a verdict that does not repeat across sizes and data sets is "
              "weak evidence. Drops compare the best depth (chosen on validation) with the "
              "last module.", "",
              "| part | size | claim | difference (pp) | verdict |", "|---|---:|---|---:|---|"]
    lines += [f"| {c['part'].removeprefix('paper-cpu-')} | {c['train_size']} | {c['claim']} | "
              f"{fmt_stat(c['diff'], sign='+')} (n={c['diff']['n']}) | {c['verdict']} |"
              for c in claims]
    return "\n".join(lines + [""])


def verdict_matrix(claims: list[dict]) -> list[str]:
    """The verdicts at a glance: a row per claim, a column per (part, size); each cell the
    verdict and the paired difference in pp (details in the claims table below)."""
    if not claims:
        return []
    cols = list(dict.fromkeys((c["part"].removeprefix("paper-cpu-"), c["train_size"])
                              for c in claims))
    rows: dict[str, dict] = {}
    for c in claims:
        rows.setdefault(c["claim"], {})[(c["part"].removeprefix("paper-cpu-"),
                                         c["train_size"])] = c
    short = {"shown": "**shown**", "contradicted": "**contradicted**", "not measured": "—"}

    def cell(c):
        if c is None:
            return ""
        v = short.get(c["verdict"], "not shown")
        return v if c["diff"]["mean"] is None else f"{v} ({fmt_stat(c['diff'], sign='+')})"
    out = ["## Verdicts at a glance", "",
           "A row per claim, a column per part and train size: the verdict and the paired "
           "difference in percentage points (mean ± 95% CI); the claims table at the end has "
           "the seeds behind each.", "",
           "| claim | " + " | ".join(f"{p} n={n}" for p, n in cols) + " |",
           "|---|" + "---|" * len(cols)]
    out += [f"| {claim} | " + " | ".join(cell(r.get(col)) for col in cols) + " |"
            for claim, r in rows.items()]
    return out + [""]


def _part_section(name: str, res: dict) -> list[str]:
    g, table = res["grid"], name.split("-")[2]
    paper = PAPER[table]
    cells = {(c["train_size"], c["arm"]): c for c in res["cells"]}
    n_all = sum(len(s) for s in g["datasets"].values()) * len(g["arms"]) * len(g["seeds"])
    lines = [f"## {name}: {g['notes']}", "",
             f"Runs {len(res['runs'])}/{n_all} ({'complete' if res['complete'] else 'PARTIAL'}), "
             f"{res['wall_s'] / 60:.0f} min; epochs per size `{json.dumps(g['datasets'])}`; "
             f"per-arm lr / tau `{json.dumps(g['arm_overrides'], sort_keys=True)}`.", "",
             "Train CE: the last module's training cross-entropy over the last 10% of the "
             "epochs, and its ratio to the CE over 70-80% of the epochs (near 1: the loss has "
             "plateaued; well below 1: still falling; the cosine schedule ends at lr 0), mean "
             "over seeds; train acc.: its training accuracy (augmented batches) over the last 10% "
             "of the epochs, in %.", "",
             "| size | arm | seeds | last (ours) | best depth (ours) | depths chosen | "
             "train CE (last 10%, ratio to 70-80%) | train acc. (last 10%) | mean run time (s) |",
             "|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for (n, a), c in sorted(cells.items(), key=lambda kv: (kv[0][0], g["arms"].index(kv[0][1]))):
        lines.append(f"| {n} | {a} | {c['n_seeds']} | {fmt_stat(c['last_test_acc'])} | "
                     f"{fmt_stat(c['best_test_acc'])} | {c['best_depths']} | "
                     f"{_plateau(res['runs'], n, a)} | {_pct(_window_mean(res['runs'], n, a, 'train_acc', 100))} | "
                     f"{c['run_s']['mean']:.0f} |")
    lines += ["", f"Paper, {paper['table']}, last block:", "",
              "| size | " + " | ".join(g["arms"]) + " |",
              "|---:|" + "---:|" * len(g["arms"])]
    for n, row in paper["rows"].items():
        lines.append(f"| {n} | " + " | ".join(
            f"{row[a][0]:.2f} ± {row[a][1]:.2f}" if a in row else "—" for a in g["arms"]) + " |")
    return lines + [""]


def _plateau(runs: list[dict], n: int, arm: str) -> str:
    last = _window_mean(runs, n, arm, "ce")
    before = _window_mean(runs, n, arm, "ce", window=(0.7, 0.8))
    return "—" if last != last else f"{last:.3f} ({last / before:.2f})"


def _pct(v: float) -> str:
    return "—" if v != v else f"{v:.2f}"


def _window_mean(runs: list[dict], n: int, arm: str, key: str, scale: float = 1.0,
                window: tuple[float, float] = (0.9, 1.0)) -> float:
    """Mean over seeds of the last module's curve `key` averaged over the `window` fraction
    of its epochs (default: the last 10%; NaN when no run has curves)."""
    curves = [r["modules"][-1]["curve"][key] for r in runs
              if r["train_size"] == n and r["arm"] == arm and "curve" in r["modules"][-1]]
    if not curves:
        return float("nan")
    lo, hi = window
    return scale * statistics.fmean(
        statistics.fmean(c[int(lo * len(c)):max(int(hi * len(c)), int(lo * len(c)) + 1)])
        for c in curves)


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _panels(parts: dict[str, dict]) -> list[tuple[str, int, dict]]:
    return [(name, n, res) for name, res in parts.items()
            for n in sorted({r["train_size"] for r in res["runs"]})]


def _grid_axes(plt, parts: dict[str, dict], per_panel: int = 1, size=(4.2, 3.2)):
    """One row per part, one column per (train size, per_panel): {(part, n): [axes]}."""
    sizes = {name: sorted({r["train_size"] for r in res["runs"]}) for name, res in parts.items()}
    ncol = per_panel * max(len(v) for v in sizes.values())
    fig, axes = plt.subplots(len(parts), ncol, squeeze=False,
                             figsize=(size[0] * ncol, size[1] * len(parts)))
    out = {}
    for i, name in enumerate(parts):
        for j, n in enumerate(sizes[name]):
            out[(name, n)] = list(axes[i][j * per_panel:(j + 1) * per_panel])
        for ax in axes[i][len(sizes[name]) * per_panel:]:
            ax.set_visible(False)
    return fig, out


def plot_modules(parts: dict[str, dict], path: Path) -> Path:
    """Test accuracy after each module, mean and 95% CI band over seeds (Figures 2-3), one
    panel per (part, train size); e2e's last-block mean as a grey line."""
    plt = _plt()
    fig, axes = _grid_axes(plt, parts, size=(4.2, 3.4))
    for name, n, res in _panels(parts):
        (ax,) = axes[(name, n)]
        cells = {c["arm"]: c for c in res["cells"] if c["train_size"] == n}
        for arm, c in cells.items():
            if arm == "e2e":
                ax.axhline(100 * c["last_test_acc"]["mean"], color="gray", ls=":", label="E2E")
                continue
            mode, kind = arm.split("-")
            _band(ax, c["per_module_test_acc"], COLORS[kind], LINES[mode],
                  f"{mode[:3]} {'TRGL' if kind == 'trgl' else 'VanGL'}")
        ax.set_title(f"{name.removeprefix('paper-cpu-')}, n={n}", fontsize=9)
        ax.set_xlabel("module", fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle("paper-cpu: test accuracy after each module (mean, 95% CI over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _band(ax, stats: list[dict], color: str, ls: str, label: str) -> None:
    xs = list(range(1, len(stats) + 1))
    mean = [100 * s["mean"] for s in stats]
    ci = [100 * (s["ci95"] or 0.0) for s in stats]
    ax.plot(xs, mean, ls, marker="o", ms=2, color=color, label=label)
    ax.fill_between(xs, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)],
                    color=color, alpha=0.15)


def plot_curves(parts: dict[str, dict], path: Path) -> Path:
    """Training cross-entropy (log scale) and training accuracy of the last module against
    its epochs (mean over seeds), per (part, train size): the evidence of how far the
    epochs take the training loss (training accuracy on augmented batches)."""
    plt = _plt()
    fig, axes = _grid_axes(plt, parts, per_panel=2, size=(3.6, 3.0))
    for name, n, res in _panels(parts):
        ax_ce, ax_acc = axes[(name, n)]
        for arm in res["grid"]["arms"]:
            runs = [r["modules"][-1]["curve"] for r in res["runs"]
                    if r["train_size"] == n and r["arm"] == arm and "curve" in r["modules"][-1]]
            if not runs:
                continue
            for ax, key in ((ax_ce, "ce"), (ax_acc, "train_acc")):
                mean = mean_curve([c[key] for c in runs])
                ax.plot(range(1, len(mean) + 1), mean, label=arm)
        title = f"{name.removeprefix('paper-cpu-')}, n={n}"
        ax_ce.set_yscale("log")
        for ax, what in ((ax_ce, "train cross-entropy"), (ax_acc, "train accuracy")):
            ax.set_title(f"{title}: {what}", fontsize=8)
            ax.set_xlabel("epoch of the last module", fontsize=8)
            ax.set_ylabel(what, fontsize=8)
            ax.tick_params(labelsize=7)
        ax_acc.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mean_curve(curves: list[list[float]]) -> list[float]:
    """Element-wise mean of curves over their common length."""
    return [statistics.fmean(c[i] for c in curves) for i in range(min(map(len, curves)))]


# --------------------------------------------------------------------------- tuning
def write_tuning_report(out_dir: Path) -> list[Path]:
    """accuracy-paper-cpu-tuning.{json,md} and -tau-sweep.png from every
    accuracy-paper-cpu-tuning-<part>.json in `out_dir` (validation accuracies only)."""
    out_dir = Path(out_dir)
    tunings = [json.loads(p.read_text())
               for p in sorted(out_dir.glob("accuracy-paper-cpu-tuning-*.json"))]
    if not tunings:
        return []
    js, md = out_dir / "accuracy-paper-cpu-tuning.json", out_dir / "accuracy-paper-cpu-tuning.md"
    write_result_json(js, {"tunings": [{k: t[k] for k in t if k != "runs"} | {
        "table": sweep_table(t)} for t in tunings]})
    atomic_write_text(md, tuning_markdown(tunings))
    return [js, md, plot_tau_sweep(tunings, out_dir / "accuracy-paper-cpu-tau-sweep.png")]


def sweep_table(t: dict) -> list[dict]:
    """One row per (arm, overrides): mean validation accuracy (last module, best depth)."""
    groups: dict[tuple, list[dict]] = {}
    for r in t["runs"]:
        groups.setdefault((r["arm"], json.dumps(r["overrides"], sort_keys=True)), []).append(r)
    return [{"arm": a, "overrides": json.loads(o),
             "last_val_acc": mean_ci95([r["last_val_acc"] for r in rs]),
             "best_val_acc": mean_ci95([r["best_val_acc"] for r in rs]), "n": len(rs),
             "diverged": sum("diverged" in r for r in rs)}
            for (a, o), rs in groups.items()]


def tuning_markdown(tunings: list[dict]) -> str:
    lines = ["# paper-cpu tuning (validation only)", "",
             "lr per arm, then tau for TRGL at the chosen lr; scored by the last module's "
             "validation accuracy (mean over the tuning seeds, ties by best-depth validation "
             "accuracy). Test accuracy is never read. Values in %, mean ± 95% CI; with 2 "
             "tuning seeds the t quantile is 12.7 and the intervals are wide: most "
             "differences between neighbouring values are within noise. A run whose loss "
             "went non-finite scores 0 (column `diverged`: how many of the seeds).", ""]
    for t in tunings:
        lines += [f"## {t['part']} (train size {t['size']}, {t['epochs']} epochs, seeds "
                  f"{t['seeds']})", "", f"Chosen: `{json.dumps(t['best'], sort_keys=True)}`", "",
                  "| arm | lr / tau | last-module val | best-depth val | diverged |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {r['arm']} | `{json.dumps(r['overrides'], sort_keys=True)}` | "
                  f"{fmt_stat(r['last_val_acc'])} | {fmt_stat(r['best_val_acc'])} | "
                  f"{r['diverged'] or ''} |" for r in sweep_table(t)]
        lines.append("")
    return "\n".join(lines)


def plot_tau_sweep(tunings: list[dict], path: Path) -> Path:
    """Validation accuracy of TRGL against tau at its chosen lr (means, and each tuning
    seed: with 2 seeds a 95% interval is too wide to draw), VanGL at its chosen lr as a
    horizontal line (the paper's Figure 4, on validation)."""
    plt = _plt()
    # a panel per TRGL arm with a tau sweep of its own (multilap takes sequential's values)
    panels = [(t, m) for t in tunings for m in ("parallel", "sequential", "multilap")
              if f"{m}-trgl" in t["best"] and any(
                  r["arm"] == f"{m}-trgl" and r["overrides"].get("lr") == t["best"][f"{m}-trgl"]["lr"]
                  for r in t["runs"])]
    fig, axes = plt.subplots(1, max(len(panels), 1), squeeze=False,
                             figsize=(4.0 * max(len(panels), 1), 3.2))
    for ax, (t, m) in zip(axes[0], panels):
        rows = sweep_table(t)
        lr = t["best"][f"{m}-trgl"]["lr"]
        mine = [r for r in rows if r["arm"] == f"{m}-trgl" and r["overrides"].get("lr") == lr]
        pts = sorted((r["overrides"]["tau"], r["last_val_acc"], r["best_val_acc"]) for r in mine
                     if not r["diverged"])  # a diverged tau is marked, not drawn at 0
        bad = sorted(r["overrides"]["tau"] for r in mine if r["diverged"])
        for j, (style, lab) in enumerate((("-o", "last module"), ("--s", "best depth"))):
            ax.plot([p[0] for p in pts], [100 * p[1 + j]["mean"] for p in pts], style,
                    color="tab:red", ms=3, label=f"TRGL, {lab} (mean)")
        seeds = [(r["overrides"]["tau"], r["last_val_acc"]) for r in t["runs"]
                 if r["arm"] == f"{m}-trgl" and r["overrides"].get("lr") == lr
                 and "diverged" not in r]
        ax.scatter([a for a, _ in seeds], [100 * b for _, b in seeds], s=8, color="tab:red",
                   alpha=0.4, label="TRGL, last module (each seed)")
        van = [r for r in rows if r["arm"] == f"{m}-vangl"
               and r["overrides"].get("lr") == t["best"].get(f"{m}-vangl", {}).get("lr")]
        if van:
            ax.axhline(100 * van[0]["last_val_acc"]["mean"], color="tab:blue", label="VanGL, last")
        if bad:
            lo = min([100 * p[1]["mean"] for p in pts] + [100 * b for _, b in seeds] or [0.0])
            ax.scatter(bad, [lo] * len(bad), marker="x", s=30, color="black",
                       label="diverged (scored 0)")
        ax.set_xscale("log")
        ax.set_xlabel("tau")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"{t['part'].removeprefix('paper-cpu-')} {m}, n={t['size']}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
