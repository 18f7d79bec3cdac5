"""Benchmark: the planner's predicted peak against the peak measured in a fresh process.

For each configuration, `edgetrain.budget.estimate.estimate_peak` (what `edgetrain plan` relies on)
is compared with a real `schedule.train` run of the same configuration in a fresh Python
process (`edgetrain.bench.memory.run_child`: synthetic data, two optimizer steps per module
and lap, then evaluation). Two comparisons are reported:

- tensors: measured peak RSS minus the child's RSS after imports minus the runtime's own
  warm-up (`runtime_rss_bytes`: warm minus import RSS of a probe process), against
  `peak_bytes` (the same convention as `edgetrain bench memory`);
- process: the child's peak RSS against `runtime_baseline_bytes() + peak_bytes`, the figure
  the planner compares with a device's budget (before its safety factor).

This file does not predict anything itself and does not parse argv (see
`benchmarks/plan_vs_measured.py`).
"""
from __future__ import annotations

from pathlib import Path
import platform
import tempfile
import time
from typing import Callable

import torch

from edgetrain import __version__
from edgetrain.bench.memory import bench_config, run_child
from edgetrain.bench.results import write_json_and_markdown
from edgetrain.budget.estimate import estimate_peak
from edgetrain.measure import runtime_baseline_bytes, runtime_rss_bytes
from edgetrain.units import MIB

TOLERANCE = 0.15

# (model, C x H x W, mode, K, batch, split): different models, regimes, K and batch sizes
DEFAULT_CONFIGS = [
    {"model": "resnet20", "input_shape": [1, 28, 28], "mode": "e2e", "modules": 1,
     "batch": 128},
    {"model": "kmresnet", "input_shape": [3, 32, 32], "mode": "parallel", "modules": 2,
     "batch": 64},
    {"model": "resnet56", "input_shape": [3, 32, 32], "mode": "multilap", "modules": 4,
     "batch": 64},
    {"model": "vgg11", "input_shape": [3, 32, 32], "mode": "multilap", "modules": 8, "batch": 32},
    {"model": "resnet110", "input_shape": [3, 32, 32], "mode": "sequential", "modules": 16,
     "batch": 16, "split": "memory"},
    {"model": "resnet110", "input_shape": [3, 96, 96], "mode": "parallel", "modules": 4,
     "batch": 32, "split": "memory"},
    {"model": "resnet110", "input_shape": [3, 96, 96], "mode": "sequential", "modules": 8,
     "batch": 32, "split": "memory"},
    {"model": "resnet56", "input_shape": [3, 64, 64], "mode": "e2e", "modules": 1, "batch": 64},
]


def _config(spec: dict, cache_dir: str):
    return bench_config(spec["model"], tuple(spec["input_shape"]), spec["batch"], spec["mode"],
                        spec["modules"], True, steps=2, split=spec.get("split", "depth"),
                        cache_dir=cache_dir)


def _ratio(measured: int | None, predicted: int) -> float | None:
    return None if measured is None or predicted <= 0 else round(measured / predicted, 3)


def measure_one(spec: dict, tmp: str, i: int, baseline_bytes: int, warm_extra_bytes: int,
                threads: int) -> dict:
    """Predict, then train `spec` in a fresh process; returns one result row."""
    cfg = _config(spec, f"{tmp}/cache{i}")
    pred = estimate_peak(cfg, tuple(cfg.input_shape), 10, n_train=cfg.train_size)
    res = run_child({"cfg": cfg.to_dict(), "out_dir": f"{tmp}/run{i}", "threads": threads})
    ok = bool(res.get("ok"))
    tensors = res["peak_rss_bytes"] - res["import_rss_bytes"] - warm_extra_bytes if ok else None
    process = res["peak_rss_bytes"] if ok else None
    row = {**spec, "split": cfg.split, "steps_per_module": 2, "train_samples": cfg.train_size,
           "ok": ok, "error": res.get("error"),
           "predicted_peak_mib": round(pred.peak_bytes / MIB, 2),
           "measured_peak_mib": None if tensors is None else round(tensors / MIB, 2),
           "ratio_tensors": _ratio(tensors, pred.peak_bytes),
           "predicted_process_mib": round((baseline_bytes + pred.peak_bytes) / MIB, 2),
           "measured_process_mib": None if process is None else round(process / MIB, 2),
           "ratio_process": _ratio(process, baseline_bytes + pred.peak_bytes),
           "import_rss_mib": round(res.get("import_rss_bytes", 0) / MIB, 2),
           "predicted_phases_mib": {k: round(getattr(pred, k + "_bytes") / MIB, 2)
                                    for k in ("train_step", "cache_write", "eval")},
           "measured_phases_mib": _phases(res),
           "max_resident_modules": res.get("max_resident_modules"),
           "wall_s": round(res.get("child_wall_s", 0.0), 1)}
    row["within_tolerance"] = ok and abs(row["ratio_tensors"] - 1) <= TOLERANCE
    row["process_within_tolerance"] = ok and abs(row["ratio_process"] - 1) <= TOLERANCE
    return row


def _phases(res: dict) -> dict:
    base = res.get("import_rss_bytes", 0) / MIB
    return {k: round(v.get("peak_rss_mib", 0) - base, 2) for k, v in res.get("phases", {}).items()
            if isinstance(v, dict)}


def bench_plan_vs_measured(configs: list[dict] | None = None, threads: int = 2,
                           out_dir: Path = Path("benchmarks/results"),
                           log: Callable[[str], None] | None = None) -> dict:
    """Compare predicted and measured peaks for `configs`; write JSON and Markdown.

    Args:
        configs: dicts with model, input_shape, mode, modules, batch (and split); default
            `DEFAULT_CONFIGS`.
        threads: torch threads of each child process.
        out_dir: where `plan_vs_measured.json` and `.md` go.
        log: called with each finished row as a line of text.

    Returns:
        The result dict, with `json_path` and `md_path`.
    """

    baseline = runtime_baseline_bytes()
    rt = runtime_rss_bytes()
    warm_extra = rt["warm_rss_bytes"] - rt["import_rss_bytes"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetrain-plan-vs-measured-") as tmp:
        for i, spec in enumerate(configs or DEFAULT_CONFIGS):
            rows.append(measure_one(spec, tmp, i, baseline, warm_extra, threads))
            if log:
                log(format_row(rows[-1]))
    result = {"benchmark": "plan_vs_measured", "edgetrain_version": __version__,
              "torch_version": torch.__version__, "machine": platform.machine(),
              "cpu_threads": threads, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "runtime_baseline_mib": round(baseline / MIB, 2),
              "runtime_warm_up_mib": round(warm_extra / MIB, 2), "tolerance": TOLERANCE,
              "measured": "tensors: peak RSS (VmHWM) of a fresh process running schedule.train, "
                          "minus its RSS after imports and the runtime's warm-up; process: the "
                          "peak RSS itself, against runtime baseline + predicted peak",
              "all_within_tolerance": all(r["within_tolerance"] for r in rows),
              "all_process_within_tolerance": all(r["process_within_tolerance"] for r in rows),
              "rows": rows}
    return write_result(result, Path(out_dir))


def write_result(result: dict, out_dir: Path) -> dict:
    """Write `plan_vs_measured.json` and `plan_vs_measured.md` into `out_dir`."""
    return write_json_and_markdown(result, out_dir, "plan_vs_measured", format_markdown)


HEADER = ("| model | input | mode | K | batch | split | tensors pred. MiB | tensors meas. MiB | "
          "ratio | process pred. MiB | process meas. MiB | ratio | tensors within 15% | "
          "process within 15% |")


def format_row(r: dict, md: bool = True) -> str:
    """One table row (Markdown)."""
    def f(v):
        return "-" if v is None else str(v)
    shape = "x".join(str(v) for v in r["input_shape"])
    cells = [r["model"], shape, r["mode"], r["modules"], r["batch"], r["split"],
             r["predicted_peak_mib"], f(r["measured_peak_mib"]), f(r["ratio_tensors"]),
             r["predicted_process_mib"], f(r["measured_process_mib"]), f(r["ratio_process"]),
             "yes" if r["within_tolerance"] else "NO",
             ("yes" if r["process_within_tolerance"] else "NO")
             + ("" if r["ok"] else f" ({r['error']})")]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_markdown(result: dict) -> str:
    """The result as a Markdown page."""
    lines = [f"# Planner: predicted vs measured peak memory ({result['date']})", "",
             f"edgetrain {result['edgetrain_version']}, torch {result['torch_version']}, "
             f"{result['machine']}, {result['cpu_threads']} threads; runtime baseline "
             f"{result['runtime_baseline_mib']} MiB. Measured: {result['measured']}. Each run: "
             "synthetic data, 2 optimizer steps per module and lap, then evaluation.", "",
             HEADER, "|" + "---|" * 14]
    lines += [format_row(r) for r in result["rows"]]
    lines += ["", f"Tensors all within {int(result['tolerance'] * 100)}%: "
                  f"{'yes' if result['all_within_tolerance'] else 'no'}; process peak all within "
                  f"{int(result['tolerance'] * 100)}%: "
                  f"{'yes' if result['all_process_within_tolerance'] else 'no'}. The runtime "
                  f"baseline ({result['runtime_baseline_mib']} MiB, of which "
                  f"{result['runtime_warm_up_mib']} MiB warm-up) dominates the process figure "
                  "of small configurations.", ""]
    return "\n".join(lines)
