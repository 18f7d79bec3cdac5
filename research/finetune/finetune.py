"""`research/finetune/run.py`: transfer with `--init` against training from scratch, and the cost
of training only the last module (`--train-modules K:K`) against all modules.

Per seed: pretrain on classes SOURCE of a data set; then, on classes TARGET with a small
train size, three arms at equal epochs: `scratch` (no init), `init-all` (`--init` the
pretrained run, every module trains) and `init-last` (`--init`, `--train-modules K:K`).
Every run is `edgetrain.train` in a fresh process (`edgetrain.bench.memory.run_child`), so
its wall time and peak resident memory (minus the same process's figure after imports) are
measured alike; ratios are taken between arms of the same seed in the same benchmark run.
The 1-minute load average is recorded before and after every run: the machine is shared.

Accuracy is the best-depth test accuracy (depth chosen on validation), mean +- 95% CI over
seeds (`research.accuracy.accuracy_report.mean_ci95`). This file does not parse argv.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
import json
import os
from pathlib import Path
import shutil
import subprocess
import tempfile
import time
from typing import Callable

from research.accuracy.accuracy_report import mean_ci95
from edgetrain.bench.memory import run_child
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.storage.atomic import atomic_write_text
from edgetrain.bench.results import write_result_json
from edgetrain.units import MIB

ARMS = ("scratch", "init-all", "init-last")


@dataclass
class FinetuneGrid:
    """What the benchmark runs; `base` are RunConfig fields shared by every run."""

    data: str = "fashion-mnist"
    source_classes: tuple[str, ...] = ("0", "1", "2", "3", "4")
    target_classes: tuple[str, ...] = ("5", "6", "7", "8", "9")
    pretrain_size: int = 2000
    target_size: int = 500
    pretrain_epochs: int = 4
    target_epochs: int = 4
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    base: dict = field(default_factory=lambda: dict(
        model="kmresnet", width=16, depth=4, modules=2, mode="sequential", batch_size=64,
        test_size=2000, classes_by="index", device="cpu"))

    def pretrain_cfg(self, seed: int) -> RunConfig:
        return RunConfig(**self.base, data=self.data, classes=self.source_classes,
                         train_size=self.pretrain_size, epochs=self.pretrain_epochs, seed=seed)

    def target_cfg(self, arm: str, seed: int, init: Path | None) -> RunConfig:
        k = self.base["modules"]
        extra = {} if arm == "scratch" else {"init": str(init)}
        if arm == "init-last":
            extra["train_modules"] = (k, k)
        return RunConfig(**self.base, data=self.data, classes=self.target_classes,
                         train_size=self.target_size, epochs=self.target_epochs, seed=seed,
                         **extra)


def smoke_grid() -> FinetuneGrid:
    """Seconds, for tests: digits, two seeds, one epoch."""
    return FinetuneGrid(data="digits", pretrain_size=300, target_size=100, pretrain_epochs=1,
                        target_epochs=1, seeds=(0, 1),
                        base=dict(model="kmresnet", width=8, depth=4, modules=2,
                                  mode="sequential", batch_size=64, classes_by="index",
                                  device="cpu"))


def uptime() -> str:
    """`uptime`'s line (load averages), or os.getloadavg() where it is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def measured_run(cfg: RunConfig, out_dir: Path, threads: int) -> dict:
    """Train `cfg` into `out_dir` in a fresh process; its accuracy, time and peak memory."""
    before = uptime()
    res = run_child({"cfg": cfg.to_dict(), "out_dir": str(out_dir), "threads": threads})
    if not res.get("ok"):
        raise UserError(f"benchmark run failed: {res.get('error')}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {"best_test_acc": metrics["best_test_acc"], "best_depth": metrics["best_depth"],
            "test_acc": [m["test_acc"] for m in metrics["modules"]],
            "train_s": metrics["timings"]["train_s"], "wall_s": res["wall_s"],
            "peak_mib": (res["peak_rss_bytes"] - res["import_rss_bytes"]) / MIB,
            "uptime_before": before, "uptime_after": uptime()}


def run_seed(grid: FinetuneGrid, seed: int, work: Path, threads: int) -> dict:
    """Pretrain, then the three target arms, for one seed."""
    src = work / f"pretrain-{seed}"
    out = {"seed": seed, "pretrain": measured_run(grid.pretrain_cfg(seed), src, threads)}
    for arm in ARMS:
        d = work / f"{arm}-{seed}"
        out[arm] = measured_run(grid.target_cfg(arm, seed, src), d, threads)
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    return out


def summarize(runs: list[dict]) -> dict:
    """Per arm: accuracy, time and memory (mean +- 95% CI); per seed ratios to `init-all`."""
    out = {}
    for arm in ARMS:
        out[arm] = {m: mean_ci95([r[arm][m] for r in runs])
                    for m in ("best_test_acc", "train_s", "peak_mib")}
    out["gain_init_vs_scratch"] = mean_ci95(
        [r["init-all"]["best_test_acc"] - r["scratch"]["best_test_acc"] for r in runs])
    out["last_vs_all_time"] = mean_ci95(
        [r["init-last"]["train_s"] / r["init-all"]["train_s"] for r in runs])
    out["last_vs_all_peak"] = mean_ci95(
        [r["init-last"]["peak_mib"] / r["init-all"]["peak_mib"] for r in runs])
    return out


def _pm(stat: dict, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    ci = "" if stat["ci95"] is None else f" ± {scale * stat['ci95']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f}{ci}{unit}"


def markdown(res: dict) -> str:
    """research/finetune/results/finetune.md."""
    g, s = res["grid"], res["summary"]
    k = g["base"]["modules"]
    rows = [f"| {arm} | {_pm(s[arm]['best_test_acc'], 100)} | {_pm(s[arm]['train_s'], 1, ' s', 1)} "
            f"| {_pm(s[arm]['peak_mib'], 1, ' MiB', 1)} |" for arm in ARMS]
    loads = [r[a]["uptime_before"] for r in res["runs"] for a in ("pretrain", *ARMS)]
    return "\n".join([
        "# Fine-tuning: `--init` against from scratch, and `--train-modules K:K`",
        "",
        f"{g['data']}: pretrain on classes {','.join(g['source_classes'])} "
        f"({g['pretrain_size']} train samples, {g['pretrain_epochs']} epochs), then train on "
        f"classes {','.join(g['target_classes'])} with {g['target_size']} train samples for "
        f"{g['target_epochs']} epochs in every arm. Model: {g['base']['model']} width "
        f"{g['base']['width']}, {g['base']['depth']} blocks, K={k}, {g['base']['mode']} "
        f"(out of core), batch {g['base']['batch_size']}, test subset "
        f"{g['base'].get('test_size')}; one torch thread; {len(res['runs'])} seeds "
        f"({', '.join(str(r['seed']) for r in res['runs'])}); mean ± 95% CI (Student t).",
        "",
        "Arms: `scratch` (no init), `init-all` (`--init` the pretrained run, all modules "
        f"train), `init-last` (`--init`, `--train-modules {k}:{k}`: module {k} trains, the "
        "frozen prefix runs once into the activation cache; its new heads train on its "
        "output). Accuracy is the best depth's test accuracy (depth chosen on validation).",
        "",
        "| arm | best-depth test acc (%) | train time | peak RSS over imports |",
        "|---|---|---|---|", *rows,
        "",
        f"- `init-all` − `scratch` (paired by seed): {_pm(s['gain_init_vs_scratch'], 100)} "
        "points.",
        f"- `init-last` / `init-all`, same seed, same benchmark run: train time "
        f"{_pm(s['last_vs_all_time'])}×, peak RSS {_pm(s['last_vs_all_peak'])}×.",
        "",
        "Reading the figures: peak RSS over imports is dominated by the data set held in RAM "
        "(uint8) and, in the `init-*` arms, by a second, transient load of the source run's "
        "data set, which `--init` reads to compare input shape and class names (recording "
        "them in the run directory would remove that cost). With a model this small, the "
        "modules' weights, gradients and activations are a small part of the peak, so "
        "`--train-modules K:K` saves time (no backward or optimizer step in the frozen prefix) "
        "rather than memory here; on a deep network the frozen prefix's parameters, gradients "
        "and optimizer state never being resident is what saves memory.",
        "",
        "Each run is a fresh process (`edgetrain.bench.memory.run_child`); peak RSS is the "
        "process's peak minus its own resident set after importing torch and edgetrain. "
        "**The machine was shared with other engineers' jobs while this ran** (2 cores), so "
        "absolute times are noisy; the ratios compare arms of the same seed run back to back. "
        f"`uptime` at the start: `{loads[0]}`; at the end: `{res['runs'][-1]['init-last']['uptime_after']}`; "
        f"every run's load is in `finetune.json`. Wall time of the benchmark: "
        f"{res['wall_s'] / 60:.1f} min.",
        "",
        "Reproduce: `nice python -m research.finetune.run`.",
        ""])


def run_finetune_benchmark(grid: FinetuneGrid, out_dir: Path, threads: int = 1,
                           log: Callable[[str], None] | None = None) -> dict:
    """Run `grid`; write `out_dir/finetune.json` and `finetune.md`; returns the result.

    Raises:
        UserError: a run that fails (its one-line error).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, runs = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="edgetrain-ft-") as tmp:
        for seed in grid.seeds:
            runs.append(run_seed(grid, seed, Path(tmp), threads))
            if log:
                log(f"seed {seed}: " + ", ".join(
                    f"{a} {100 * runs[-1][a]['best_test_acc']:.1f}%" for a in ARMS))
    res = {"benchmark": "finetune", "grid": asdict(grid), "threads": threads, "runs": runs,
           "wall_s": time.perf_counter() - t0, "summary": summarize(runs)}
    write_result_json(out_dir / "finetune.json", res)
    atomic_write_text(out_dir / "finetune.md", markdown(res))
    return res
