"""Investigation of TRGL against VanGL where the paper's advantage does not show at CPU scale.

What this file holds: the extra runs (`investigation_gridset`: the Table 13 analogue on
digits at 150 samples with 10 and 40 one-block modules instead of 20, and TRGL with the
per-sample transport scaling instead of the per-element one) and the figures and page
(`write_investigation`) built from those runs and from the `paper-cpu` parts' records
(training curves, residue energies, per-module accuracies, recorded by
`research.paper_cpu.paper_cpu.run_traced`). It trains nothing itself; `run_benchmark` runs the
grid set, resumable like every accuracy grid.

Files: research/investigate/results/investigate-paper-cpu-*.png, -numbers.json and -tables.md (generated
here) and investigate-paper-cpu.md (the prose, written by hand from them).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import statistics

from research.accuracy.accuracy import GridSet
from research.accuracy.accuracy_report import mean_ci95
from research.paper_cpu.paper_cpu import SEEDS, TUNED, part_grid, run_traced
from research.paper_cpu.paper_cpu_report import drop, fmt_stat, mean_curve
from edgetrain.storage.atomic import atomic_write_text
from edgetrain.bench.results import write_result_json

INV_SIZE = 150
INV_SEEDS = SEEDS[:3]
E2E_LONG = 3  # e2e's training loss had not plateaued at the compute-matched epochs


def investigation_gridset(tuned: dict | None = None) -> GridSet:
    """Runs beyond the preset, on digits at 150 samples (t13-digits' lr / tau, 3 seeds):
    `k10` / `k40`: parallel VanGL and TRGL with 10 and 40 one-block modules (depth = K);
    `sample`: parallel TRGL with `transport_scaling="sample"` and tau multiplied by the
    first half's feature size C*H*W (32*8*8 = 2,048), which gives the first half exactly
    the loss of the `mean` scaling (W_sample = C*H*W * W_mean) and the second half
    (64*4*4 = 1,024 numbers) half its weight: per-sample scaling differs from per-element
    scaling only in how it weighs feature maps of different sizes;
    `e2e-long`: e2e with `E2E_LONG` times the compute-matched epochs (is e2e's accuracy
    limited by its budget?); `vangl-lr`: VanGL at TRGL's tuned lr, at both of t13-digits'
    sizes and with all its seeds (does TRGL's edge come from the transport term or from its
    smaller lr?); `init`: VanGL and TRGL (same lr) with PyTorch's default initialisation
    instead of the orthogonal gain 0.05 that starts every block at the identity (do later
    modules degrade when the blocks start far from the identity?); `k10-vangl-lr` /
    `k40-vangl-lr`: the K runs' VanGL at TRGL's lr."""
    t13 = part_grid("t13", "digits", tuned)
    over = {**TUNED, **(tuned or {})}.get(t13.name, {})
    parts = []
    for k in (10, 40):
        parts.append(dataclasses.replace(
            t13, name=f"investigate-k{k}", arms=["parallel-vangl", "parallel-trgl"],
            datasets={"digits": {INV_SIZE: t13.datasets["digits"][INV_SIZE]}},
            seeds=list(INV_SEEDS), base={**t13.base, "depth": k, "modules": k},
            notes=f"t13-digits with {k} one-block modules"))
    trgl = dict(over.get("parallel-trgl", {}))
    trgl["tau"] = trgl.get("tau", t13.base["tau"]) * 32 * 8 * 8
    parts.append(dataclasses.replace(
        t13, name="investigate-sample", arms=["parallel-trgl"],
        datasets={"digits": {INV_SIZE: t13.datasets["digits"][INV_SIZE]}},
        seeds=list(INV_SEEDS), base={**t13.base, "transport_scaling": "sample"},
        arm_overrides={"parallel-trgl": trgl},
        notes="t13-digits TRGL with per-sample transport scaling"))
    e2e = dict(over.get("e2e", {}))
    parts.append(dataclasses.replace(
        t13, name="investigate-e2e-long", arms=["e2e"],
        datasets={"digits": {INV_SIZE: E2E_LONG * t13.datasets["digits"][INV_SIZE]}},
        seeds=list(INV_SEEDS), arm_overrides={"e2e": e2e},
        notes=f"t13-digits e2e with {E2E_LONG}x the compute-matched epochs"))
    van = dict(over.get("parallel-vangl", {}), lr=trgl.get("lr", t13.base["lr"]))
    parts.append(dataclasses.replace(
        t13, name="investigate-vangl-lr", arms=["parallel-vangl"],
        datasets={"digits": dict(t13.datasets["digits"])}, seeds=list(t13.seeds),
        arm_overrides={"parallel-vangl": van},
        notes="t13-digits VanGL at TRGL's learning rate"))
    parts.append(dataclasses.replace(
        t13, name="investigate-init", arms=["parallel-vangl", "parallel-trgl"],
        datasets={"digits": {INV_SIZE: t13.datasets["digits"][INV_SIZE]}},
        seeds=list(INV_SEEDS), base={**t13.base, "init_gain": None},
        arm_overrides={"parallel-vangl": van, "parallel-trgl": dict(over.get("parallel-trgl", {}))},
        notes="t13-digits with PyTorch's default init (blocks far from the identity), "
              "VanGL and TRGL at the same lr"))
    for k in (10, 40):  # the K runs' VanGL at TRGL's lr (they inherit t13-digits' lr confound)
        parts.append(dataclasses.replace(
            t13, name=f"investigate-k{k}-vangl-lr", arms=["parallel-vangl"],
            datasets={"digits": {INV_SIZE: t13.datasets["digits"][INV_SIZE]}},
            seeds=list(INV_SEEDS), base={**t13.base, "depth": k, "modules": k},
            arm_overrides={"parallel-vangl": van},
            notes=f"t13-digits VanGL with {k} one-block modules at TRGL's learning rate"))
    # the 40-module runs, the longest, next to last; the runs added later after them
    parts = [parts[i] for i in (0, 2, 4, 3, 1, 5, 6, 7)]
    return GridSet(name="investigate", parts=parts, runner=run_traced,
                   report=lambda res, prefix, plots: write_investigation(Path(prefix).parent))


# --------------------------------------------------------------------------- loading
# the paper-cpu study's results, which the investigation reads beside its own
PAPER_CPU_RESULTS = Path(__file__).resolve().parents[1] / "paper_cpu" / "results"


def result_file(out_dir: Path, filename: str) -> Path:
    """`filename` in `out_dir`, else in the paper-cpu study's results."""
    p = Path(out_dir) / filename
    return p if p.is_file() else PAPER_CPU_RESULTS / filename


def _load(out_dir: Path, name: str) -> dict | None:
    p = result_file(out_dir, f"accuracy-{name}.json")
    return json.loads(p.read_text()) if p.is_file() else None


def _runs(res: dict | None, arm: str, n: int) -> list[dict]:
    return [r for r in (res or {}).get("runs", []) if r["arm"] == arm and r["train_size"] == n]


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_transport_vs_ce(res: dict, n: int, path: Path, mode: str = "parallel") -> Path | None:
    """Per module, over training (mean over seeds): TRGL's cross-entropy and its transport
    term W / (2 tau_k), and VanGL's cross-entropy and (unpenalised) W / (2 tau_k) at TRGL's
    tau, for a few modules; right: the end-of-training values for every module. `mode`:
    the regime whose arms are drawn (parallel, sequential or multilap)."""
    trgl, van = _runs(res, f"{mode}-trgl", n), _runs(res, f"{mode}-vangl", n)
    if not trgl or not van:
        return None
    plt = _plt()
    K = len(trgl[0]["modules"])
    taus = [m["tau"] for m in trgl[0]["modules"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, color in zip(sorted({0, K // 4, K // 2, 3 * K // 4, K - 1}), plt.cm.viridis(
            [i / 4 for i in range(5)])):
        ce = mean_curve([r["modules"][k]["curve"]["ce"] for r in trgl])
        w = mean_curve([r["modules"][k]["curve"]["transport"] for r in trgl])
        a1.plot(range(1, len(ce) + 1), ce, "-", color=color, label=f"module {k + 1} CE")
        a1.plot(range(1, len(w) + 1), [v / (2 * taus[k]) for v in w], "--", color=color,
                label=f"module {k + 1} W/2tau")
    a1.set_yscale("log")
    a1.set_xlabel("epoch of the module")
    part = res["grid"]["name"].removeprefix("paper-cpu-")
    a1.set_title(f"{part} {mode} TRGL, n={n}: CE (solid) vs transport term (dashed)", fontsize=9)
    a1.legend(fontsize=6, ncol=2)
    xs = list(range(1, K + 1))
    for runs, kind, color in ((trgl, "TRGL", "tab:red"), (van, "VanGL", "tab:blue")):
        ce = [statistics.fmean(r["modules"][k]["curve"]["ce"][-1] for r in runs) for k in range(K)]
        w = [statistics.fmean(r["modules"][k]["curve"]["transport"][-1] for r in runs)
             / (2 * taus[k]) for k in range(K)]
        a2.plot(xs, ce, "-o", ms=3, color=color, label=f"{kind} CE")
        a2.plot(xs, w, "--s", ms=3, color=color, label=f"{kind} W/2tau (TRGL's tau)")
    a2.set_yscale("log")
    a2.set_xlabel("module")
    a2.set_title("last epoch, per module", fontsize=9)
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_residues(parts: dict[str, dict], path: Path) -> Path | None:
    """Residue energy per block after training (validation split, mean over seeds): mean
    r**2 per element, ||r|| / ||x|| and the block input's mean x**2 (the residual stream's
    size), for every arm of every part at its smaller size."""
    panels = [(name, res) for name, res in parts.items() if res and res["runs"]]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(3, len(panels), squeeze=False, figsize=(4.3 * len(panels), 8.5))
    for j, (name, res) in enumerate(panels):
        n = min(r["train_size"] for r in res["runs"])
        for arm in res["grid"]["arms"]:
            rs = [r for r in _runs(res, arm, n) if "residue_energy" in r]
            if not rs:
                continue
            for i, key in enumerate(("mean", "relative")):
                ys = mean_curve([r["residue_energy"][key] for r in rs])
                axes[i][j].plot(range(1, len(ys) + 1), ys, "-o", ms=2, label=arm)
            e = mean_curve([r["residue_energy"]["mean"] for r in rs])
            rel = mean_curve([r["residue_energy"]["relative"] for r in rs])
            x2 = [a / max(b * b, 1e-30) for a, b in zip(e, rel)]  # mean x**2 = r**2 / rel**2
            axes[2][j].plot(range(1, len(x2) + 1), x2, "-o", ms=2, label=arm)
        for i, lab in enumerate(("mean r^2 per element", "||r|| / ||x||",
                                 "block input: mean x^2 per element")):
            axes[i][j].set_yscale("log")
            axes[i][j].set_ylabel(lab, fontsize=8)
            axes[i][j].set_xlabel("block", fontsize=8)
            axes[i][j].legend(fontsize=6)
        axes[0][j].set_title(f"{name.removeprefix('paper-cpu-')}, n={n}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_modules_and_sizes(out_dir: Path, t13: dict | None, path: Path) -> Path | None:
    """Per-module test accuracy (mean, 95% CI) of parallel VanGL / TRGL with K = 10, 20, 40
    one-block modules at 150 samples, with K = 20 at 150 and 600 samples, and with the
    default init (`investigate-init`)."""
    series = []
    for k, res in ((10, _load(out_dir, "investigate-k10")), (20, t13),
                   (40, _load(out_dir, "investigate-k40"))):
        series.append((f"K={k}, n={INV_SIZE}", res, INV_SIZE))
    series.append(("K=20, n=600", t13, 600))
    series.append((f"K=20, n={INV_SIZE}, default init, same lr",
                   _load(out_dir, "investigate-init"), INV_SIZE))
    series = [s for s in series if _runs(s[1], "parallel-trgl", s[2])]
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), squeeze=False, figsize=(4 * len(series), 3.4))
    for ax, (title, res, n) in zip(axes[0], series):
        for arm, color in (("parallel-vangl", "tab:blue"), ("parallel-trgl", "tab:red")):
            rs = _runs(res, arm, n)
            if not rs:
                continue
            K = len(rs[0]["modules"])
            st = [mean_ci95([r["modules"][k]["test_acc"] for r in rs]) for k in range(K)]
            m = [100 * s["mean"] for s in st]
            c = [100 * (s["ci95"] or 0) for s in st]
            ax.plot(range(1, K + 1), m, "-o", ms=2, color=color, label=arm)
            ax.fill_between(range(1, K + 1), [a - b for a, b in zip(m, c)],
                            [a + b for a, b in zip(m, c)], color=color, alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("module", fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- page
def write_investigation(out_dir: Path) -> list[Path]:
    """The figures, and investigate-paper-cpu-numbers.json with the numbers they show (the
    prose is written by hand in investigate-paper-cpu.md from these)."""
    out_dir = Path(out_dir)
    parts = {n: _load(out_dir, f"paper-cpu-{n}") for n in
             ("t13-digits", "t12-digits", "t13-fashion-mnist", "t12-fashion-mnist")}
    t13 = parts["t13-digits"]
    paths = []
    for name, res in parts.items():
        for n in sorted({r["train_size"] for r in (res or {}).get("runs", [])}):
            mode = "parallel" if name.startswith("t13") else "sequential"
            p = plot_transport_vs_ce(
                res, n, out_dir / f"investigate-paper-cpu-transport-{name}-n{n}.png", mode)
            paths += [p] if p else []
    for p in (plot_residues(parts, out_dir / "investigate-paper-cpu-residues.png"),
              plot_modules_and_sizes(out_dir, t13, out_dir / "investigate-paper-cpu-modules.png")):
        paths += [p] if p else []
    js = out_dir / "investigate-paper-cpu-numbers.json"
    write_result_json(js, numbers(out_dir, parts))
    md = out_dir / "investigate-paper-cpu-tables.md"
    atomic_write_text(md, tables_markdown(out_dir, parts))
    return paths + [js, md]


# --------------------------------------------------------------------------- tables
MODES = ("parallel", "sequential", "multilap")


def _pp(stat: dict) -> str:
    return fmt_stat(stat, sign="+")


def _paired(a: list[dict], b: list[dict], get) -> dict:
    """mean_ci95 over the seeds both lists hold of get(run of a) - get(run of b)."""
    bs = {r["seed"]: r for r in b}
    return mean_ci95([get(r) - get(bs[r["seed"]]) for r in a if r["seed"] in bs])


def _module1(r: dict) -> float:
    return r["modules"][0]["test_acc"]


def _last(r: dict) -> float:
    return r["last_test_acc"]


def _best(r: dict) -> float:
    return r["best_test_acc"]


def _per_module(rs: list[dict]) -> list[float]:
    """Per module, the mean test accuracy over the runs."""
    return [statistics.fmean(r["modules"][k]["test_acc"] for r in rs)
            for k in range(len(rs[0]["modules"]))]


def _depth_cells(rs: list[dict]) -> str:
    """module 1 | peak module (mean) | last | best - last: the depth columns of one arm."""
    per = _per_module(rs)
    return (f"{fmt_stat(mean_ci95([_module1(r) for r in rs]))} | "
            f"{100 * max(per):.2f} (module {per.index(max(per)) + 1}) | "
            f"{fmt_stat(mean_ci95([_last(r) for r in rs]))} | {_pp(mean_ci95([drop(r) for r in rs]))}")


def _ratio_rows(rs: list[dict], epoch: int) -> float | None:
    """Median over modules of (W / 2 tau_k) / CE at `epoch` (index into the curves), mean
    over runs; None without curves or tau."""
    vals = []
    for r in rs:
        ms = [m for m in r["modules"] if "curve" in m and m.get("tau")]
        if not ms:
            return None
        vals.append(statistics.median(m["curve"]["transport"][epoch] / (2 * m["tau"])
                                      / max(m["curve"]["ce"][epoch], 1e-12) for m in ms))
    return statistics.fmean(vals) if vals else None


def _shrink(trgl: list[dict], van: list[dict]) -> float | None:
    """Median over modules of VanGL's final (unpenalised) W over TRGL's, mean over the
    common seeds: how much the penalty shrinks the transport cost."""
    vs = {r["seed"]: r for r in van}
    vals = []
    for t in trgl:
        v = vs.get(t["seed"])
        if v is None or "curve" not in t["modules"][0]:
            continue
        vals.append(statistics.median(
            vm["curve"]["transport"][-1] / max(tm["curve"]["transport"][-1], 1e-12)
            for tm, vm in zip(t["modules"], v["modules"])))
    return statistics.fmean(vals) if vals else None


def tables_markdown(out_dir: Path, parts: dict[str, dict | None]) -> str:
    """The investigation's tables, computed from the results on disk (the prose of
    investigate-paper-cpu.md cites them): depth, TRGL - VanGL, the transport term against
    the cross-entropy, the number of modules and the same-lr comparison. Accuracies in %,
    differences in percentage points, mean ± 95% CI half-width over the paired seeds."""
    L = ["# Investigation tables (generated by `research.investigate.investigate`)", "",
         "Test accuracy in %, differences in percentage points (pp), mean ± 95% Student-t "
         "half-width over seeds; differences are paired by seed (same training subset and "
         "initialisation). `best - last`: the depth chosen on validation against the last "
         "module (the paper's mechanism predicts VanGL > 0 and TRGL about 0); `peak - last`: "
         "the highest per-module mean test accuracy against the last module's (descriptive, "
         "chosen on test).", "",
         "## 1. Depth: does VanGL lose accuracy in its later modules, and TRGL less?", "",
         "| part | n | arm | seeds | module 1 | peak module (mean) | last | best - last (pp) "
         "| peak - last (pp) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    diffs = ["## 2. TRGL - VanGL, paired (pp)", "",
             "| part | n | regime | seeds | module 1 | last | best depth | VanGL drop - TRGL "
             "drop |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    trans = ["## 3. The transport term against the cross-entropy (TRGL)", "",
             "(W / 2 tau_k) / CE: median over modules, mean over seeds, at the first and the "
             "last epoch; shrink: VanGL's unpenalised W over TRGL's at the last epoch (median "
             "over modules): how much the penalty reduces the transport cost.", "",
             "| part | n | regime | (W/2tau)/CE, epoch 1 | (W/2tau)/CE, last epoch | "
             "shrink of W |", "|---|---:|---|---:|---:|---:|"]
    for name, res in parts.items():
        for n in sorted({r["train_size"] for r in (res or {}).get("runs", [])}):
            for mode in MODES:
                van, trgl = _runs(res, f"{mode}-vangl", n), _runs(res, f"{mode}-trgl", n)
                for arm, rs in ((f"{mode}-vangl", van), (f"{mode}-trgl", trgl)):
                    if not rs:
                        continue
                    per = _per_module(rs)
                    L.append(f"| {name} | {n} | {arm} | {len(rs)} | {_depth_cells(rs)} | "
                             f"{100 * (max(per) - per[-1]):+.2f} |")
                if van and trgl:
                    st = [_paired(trgl, van, f) for f in (_module1, _last, _best)]
                    dd = _paired(van, trgl, drop)
                    diffs.append(f"| {name} | {n} | {mode} | {st[0]['n']} | "
                                 + " | ".join(_pp(x) for x in st) + f" | {_pp(dd)} |")
                    r1, r2, sh = _ratio_rows(trgl, 0), _ratio_rows(trgl, -1), _shrink(trgl, van)
                    fmt = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
                    trans.append(f"| {name} | {n} | {mode} | {fmt(r1)} | {fmt(r2)} | "
                                 f"{fmt(sh)}{'x' if sh is not None else ''} |")
    L += [""] + diffs + [""] + trans + [""]
    L += ["## 4. The number of modules (digits, 150 samples, parallel, one block per module)",
          "", "VanGL at its tuned lr (0.05 on t13-digits) and, where run, at TRGL's lr (`same "
          "lr`: `investigate-k10-vangl-lr`, `-k40-vangl-lr`, `-vangl-lr`).", "",
          "| K | seeds | VanGL last | TRGL last | TRGL - VanGL last (pp) | TRGL - VanGL same lr, "
          "last (pp) | VanGL best - last (pp) | VanGL same lr, best - last (pp) | TRGL best - "
          "last (pp) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    t13 = parts.get("t13-digits")
    for k, res, same in ((10, _load(out_dir, "investigate-k10"),
                          _load(out_dir, "investigate-k10-vangl-lr")),
                         (20, t13, _load(out_dir, "investigate-vangl-lr")),
                         (40, _load(out_dir, "investigate-k40"),
                          _load(out_dir, "investigate-k40-vangl-lr"))):
        van, trgl = _runs(res, "parallel-vangl", INV_SIZE), _runs(res, "parallel-trgl", INV_SIZE)
        if not van or not trgl:
            continue
        van2 = _runs(same, "parallel-vangl", INV_SIZE)
        seeds = {r["seed"] for r in van}  # the same seeds as the tuned-lr VanGL
        van2 = [r for r in van2 if r["seed"] in seeds]
        L.append(f"| {k} | {len(van)}/{len(trgl)} | {fmt_stat(mean_ci95([_last(r) for r in van]))} | "
                 f"{fmt_stat(mean_ci95([_last(r) for r in trgl]))} | "
                 f"{_pp(_paired(trgl, van, _last))} | "
                 f"{_pp(_paired(trgl, van2, _last)) if van2 else '—'} | "
                 f"{_pp(mean_ci95([drop(r) for r in van]))} | "
                 f"{_pp(mean_ci95([drop(r) for r in van2])) if van2 else '—'} | "
                 f"{_pp(mean_ci95([drop(r) for r in trgl]))} |")
    same = _load(out_dir, "investigate-vangl-lr")
    def lr_of(res, arm):
        return (res or {}).get("grid", {}).get("arm_overrides", {}).get(arm, {}).get("lr")
    lr = {"vangl": lr_of(t13, "parallel-vangl"), "trgl": lr_of(t13, "parallel-trgl")}
    lr2 = lr_of(same, "parallel-vangl")
    L += ["", "## 5. At the same learning rate (digits, parallel, 20 modules)", "",
          f"t13-digits was tuned per arm before the preset gave TRGL its VanGL arm's lr (VanGL "
          f"{lr['vangl']}, TRGL {lr['trgl']}); `investigate-vangl-lr` reruns VanGL at {lr2}.",
          "", f"| n | seeds | TRGL - VanGL(lr {lr2}): module 1 | last | best depth | "
          f"VanGL({lr2}) - VanGL({lr['vangl']}): last |", "|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({r["train_size"] for r in (same or {}).get("runs", [])}):
        van2, trgl = _runs(same, "parallel-vangl", n), _runs(t13, "parallel-trgl", n)
        van5 = _runs(t13, "parallel-vangl", n)
        st = [_paired(trgl, van2, f) for f in (_module1, _last, _best)]
        L.append(f"| {n} | {st[0]['n']} | " + " | ".join(_pp(x) for x in st)
                 + f" | {_pp(_paired(van2, van5, _last))} |")
    init = _load(out_dir, "investigate-init")
    van, trgl = _runs(init, "parallel-vangl", INV_SIZE), _runs(init, "parallel-trgl", INV_SIZE)
    if van and trgl:
        L += ["", "## 6. Blocks far from the identity (PyTorch's default init, same lr; digits, "
              f"{INV_SIZE} samples, parallel, 20 modules)", "",
              "| arm | seeds | module 1 | peak module (mean) | last | best - last (pp) |",
              "|---|---:|---:|---:|---:|---:|"]
        for arm, rs in (("parallel-vangl", van), ("parallel-trgl", trgl)):
            L.append(f"| {arm} | {len(rs)} | {_depth_cells(rs)} |")
        L += ["", "TRGL - VanGL (pp): module 1 " + _pp(_paired(trgl, van, _module1)) + ", last "
              + _pp(_paired(trgl, van, _last)) + ", best depth " + _pp(_paired(trgl, van, _best))
              + "; VanGL drop - TRGL drop " + _pp(_paired(van, trgl, drop)) + "."]
    return "\n".join(L + [""])


def halves(res: dict, n: int) -> dict:
    """Per arm, per seed: mean test accuracy of the modules before the midpoint block (the
    one that downsamples) and from it on, and the drop between them; and the paired
    TRGL - VanGL difference of each half (mean and 95% CI over seeds, in [0, 1])."""
    def split(r):
        accs = [m["test_acc"] for m in r["modules"]]
        h = len(accs) // 2
        return statistics.fmean(accs[:h]), statistics.fmean(accs[h:])
    out, per = {}, {}
    for arm in ("parallel-vangl", "parallel-trgl", "sequential-vangl", "sequential-trgl",
                "multilap-vangl", "multilap-trgl"):
        rs = _runs(res, arm, n)
        if not rs or len(rs[0]["modules"]) < 2:
            continue
        per[arm] = {r["seed"]: split(r) for r in rs}
        v = list(per[arm].values())
        out[arm] = {"first_half": mean_ci95([a for a, _ in v]),
                    "second_half": mean_ci95([b for _, b in v]),
                    "drop": mean_ci95([a - b for a, b in v])}
    for m in ("parallel", "sequential", "multilap"):
        t, v = per.get(f"{m}-trgl"), per.get(f"{m}-vangl")
        if t and v:
            seeds = sorted(set(t) & set(v))
            for i, half in enumerate(("first_half", "second_half")):
                out[f"{m}_trgl_minus_vangl_{half}"] = mean_ci95(
                    [t[s][i] - v[s][i] for s in seeds])
    return out


def numbers(out_dir: Path, parts: dict[str, dict | None]) -> dict:
    """Per part and size: each arm's last-module and best-depth test accuracy, its drop
    from best to last, its final CE and transport per module; plus the K and scaling runs."""
    out = {}
    extra = {n: _load(out_dir, f"investigate-{n}") for n in ("k10", "k40", "sample", "e2e-long",
                                                            "vangl-lr")}
    for name, res in {**parts, **extra}.items():
        if not res:
            continue
        for n in sorted({r["train_size"] for r in res["runs"]}):
            for arm in res["grid"]["arms"]:
                rs = _runs(res, arm, n)
                if not rs:
                    continue
                K = len(rs[0]["modules"])
                out.setdefault(name, {}).setdefault(str(n), {})["halves"] = halves(res, n)
                out[name][str(n)][arm] = {
                    "seeds": [r["seed"] for r in rs],
                    "last_test_acc": mean_ci95([r["last_test_acc"] for r in rs]),
                    "best_test_acc": mean_ci95([r["best_test_acc"] for r in rs]),
                    "max_module_mean_test_acc": max(statistics.fmean(
                        r["modules"][k]["test_acc"] for r in rs) for k in range(K)),
                    "first_module_test_acc": mean_ci95([r["modules"][0]["test_acc"] for r in rs]),
                    "final_ce": [statistics.fmean(r["modules"][k]["curve"]["ce"][-1] for r in rs)
                                 for k in range(K)] if "curve" in rs[0]["modules"][0] else None,
                    "final_transport": [statistics.fmean(
                        r["modules"][k]["curve"]["transport"][-1] for r in rs)
                        for k in range(K)] if "curve" in rs[0]["modules"][0] else None,
                    "tau": [m.get("tau") for m in rs[0]["modules"]],
                    "residue_relative": mean_curve([r["residue_energy"]["relative"] for r in rs])
                    if "residue_energy" in rs[0] else None}
    return out
