"""Benchmark: `edgetrain train --fit` per device profile, predicted against measured peak.

For each (profile, model, input), one `edgetrain train --fit --device-profile NAME` runs in a
fresh Python process (synthetic data, 1 epoch): it plans, prints the plan and trains with the
budget guard on. The child's peak RSS comes from the kernel (`os.wait4`'s `ru_maxrss` of
that child), next to what the plan predicted (read back from the run's config.json
`extra["fit"]`), the profile's budget and the machine's load (`os.getloadavg`) before and
after. A row passes when the run completed and its measured peak is within the budget.

This file does not parse argv (see `benchmarks/fit_vs_measured.py`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from edgetrain import __version__
from edgetrain.bench.results import write_json_and_markdown
from edgetrain.budget.devices import load_profile
from edgetrain.units import MIB

PROFILES = ("cpu-2gb", "raspberry-pi-4-4gb", "raspberry-pi-5-8gb")
MODELS = (("resnet56", "3x64x64"), ("resnet110", "3x96x96"))
SAMPLES = 256


def fit_command(profile: str, model: str, shape: str, out: Path, samples: int = SAMPLES,
                epochs: int = 1) -> list[str]:
    """The `edgetrain train --fit` command of one row (only data, model and epochs given)."""
    return [sys.executable, "-m", "edgetrain.cli", "train", "--fit", "--device-profile", profile,
            "--data", "synthetic", "--input", shape, "--synthetic-size", str(samples),
            "--model", model, "--epochs", str(epochs), "--out", str(out), "--no-progress"]


def run_fresh(cmd: list[str], env: dict, timeout_s: float) -> dict:
    """Run `cmd` in a fresh process; returns its exit code, output tail, wall time and the
    kernel's peak RSS of that child (`ru_maxrss`, KiB on Linux)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = t0 + timeout_s
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.2)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    return {"rc": p.returncode, "output": text, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def measure_row(profile: str, model: str, shape: str, tmp: Path, env: dict,
                timeout_s: float) -> dict:
    """One row: plan and train in a fresh process, then compare its peak with the plan."""
    prof = load_profile(profile)
    out = tmp / f"{profile}-{model}"
    load_before = os.getloadavg()
    res = run_fresh(fit_command(profile, model, shape, out), env, timeout_s)
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    fit = cfg.get("extra", {}).get("fit", {})
    plan = {k: cfg.get(k) for k in ("mode", "modules", "split", "batch_size", "laps",
                                    "cache_dtype")} if cfg else None
    ok = res["rc"] == 0 and (out / "metrics.json").is_file()
    # the run resets VmHWM per phase (clear_refs), which also lowers the kernel's ru_maxrss:
    # the process peak is the largest per-phase peak metrics.json records
    metrics = json.loads((out / "metrics.json").read_text()) if ok else {}
    peak = max(res["peak_rss_bytes"], int(metrics.get("peak_rss_mib", 0) * MIB))
    return {"profile": profile, "model": model, "input": shape, "samples": SAMPLES, "epochs": 1,
            "budget_mib": round(prof.budget_bytes / MIB, 1), "completed": ok, "rc": res["rc"],
            "plan": plan,
            "predicted_process_mib": round((fit["runtime_baseline_bytes"]
                                            + fit["peak_tensor_bytes"]) / MIB, 1) if fit else None,
            "planned_needed_mib": round(fit["needed_bytes"] / MIB, 1) if fit else None,
            "measured_peak_rss_mib": round(peak / MIB, 1),
            "within_budget": ok and peak <= prof.budget_bytes,
            "ratio_measured_to_predicted": round(peak / (fit["runtime_baseline_bytes"]
                                                         + fit["peak_tensor_bytes"]), 3)
            if fit else None,
            "wall_s": res["wall_s"], "load_before": [round(v, 2) for v in load_before],
            "load_after": [round(v, 2) for v in os.getloadavg()],
            "error": None if ok else res["output"].strip().splitlines()[-1:] or ["no output"]}


def bench_fit_vs_measured(profiles=PROFILES, models=MODELS, out_dir: Path = Path("benchmarks/results"),
                          timeout_s: float = 3600, log: Callable[[str], None] | None = None,
                          keep: bool = False) -> dict:
    """Run every (profile, model) `--fit` row, one at a time; write JSON and Markdown.

    `keep`: start from the rows of the existing fit_vs_measured.json and run only the
    (profile, model) pairs it lacks (every row carries the date it was measured).

    Returns:
        The result dict, with `json_path` and `md_path`.
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    old = Path(out_dir) / "fit_vs_measured.json"
    rows = [r for r in json.loads(old.read_text())["rows"] if r.get("completed")] \
        if keep and old.is_file() else []
    done = {(r["profile"], r["model"]) for r in rows}
    todo = len(profiles) * len(models)
    result = _result(rows, todo)
    with tempfile.TemporaryDirectory(prefix="edgetrain-fit-") as tmp:
        for profile in profiles:
            for model, shape in models:
                if (profile, model) in done:
                    continue
                rows.append(measure_row(profile, model, shape, Path(tmp), env, timeout_s))
                rows[-1]["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                if log:
                    log(format_row(rows[-1]))
                result = _result(rows, todo)  # written after every row: a stopped run keeps them
                write_result(result, Path(out_dir))
    return write_result(result, Path(out_dir))


def _result(rows: list[dict], todo: int) -> dict:
    return {"benchmark": "fit_vs_measured", "edgetrain_version": __version__,
              "torch_version": torch.__version__, "machine": platform.machine(),
              "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "measured": "peak RSS of the fresh `edgetrain train --fit` process (the largest "
                          "per-phase VmHWM its metrics.json records; os.wait4's ru_maxrss is "
                          "lowered by the per-phase clear_refs resets), against the profile's budget and the plan's runtime "
                          "baseline + predicted tensor peak",
              "all_within_budget": bool(rows) and all(r["within_budget"] for r in rows), "rows": rows,
              "rows_planned": todo}


def write_result(result: dict, out_dir: Path) -> dict:
    """Write `fit_vs_measured.json` and `fit_vs_measured.md` into `out_dir`."""
    return write_json_and_markdown(result, out_dir, "fit_vs_measured", format_markdown)


HEADER = ("| profile | model | input | budget MiB | plan | predicted MiB | planned need MiB | "
          "measured peak RSS MiB | meas./pred. | within budget | wall s | load (1 min) before/after |")


def format_row(r: dict) -> str:
    p = r["plan"]
    plan = "-" if not p else (f"{p['mode']} K={p['modules']} {p['split']} b{p['batch_size']}"
                              + (f" {p['laps']} laps" if p["mode"] == "multilap" else "")
                              + (f" {p['cache_dtype']}" if p["mode"] in ("sequential", "multilap") else ""))
    cells = [r["profile"], r["model"], r["input"], r["budget_mib"], plan, r["predicted_process_mib"],
             r["planned_needed_mib"], r["measured_peak_rss_mib"], r["ratio_measured_to_predicted"],
             ("yes" if r["within_budget"] else "NO") + ("" if r["completed"] else f" ({r['error']})"),
             r["wall_s"], f"{r['load_before'][0]} / {r['load_after'][0]}"]
    return "| " + " | ".join("-" if c is None else str(c) for c in cells) + " |"


def format_markdown(result: dict) -> str:
    lines = [f"# `edgetrain train --fit`: predicted vs measured peak per profile ({result['date']})",
             "", f"edgetrain {result['edgetrain_version']}, torch {result['torch_version']}, "
             f"{result['machine']}, {result['cpu_count']} cores. Each row: one fresh process "
             f"running `edgetrain train --fit --device-profile NAME --data synthetic --input "
             f"CxHxW --synthetic-size {SAMPLES} --model M --epochs 1` (plan, then train with the "
             "budget guard on). Measured: " + result["measured"] + ". Profiles are emulated on "
             "this x86_64 machine: their budgets, not their CPUs. Wall times are this machine's "
             "(load averages per row), not device speeds.", "", HEADER, "|" + "---|" * 12]
    lines += [format_row(r) for r in result["rows"]]
    lines += ["", "When each row was measured:"] + [
        f"- {r['profile']} {r['model']}: {r.get('measured_at', result['date'])}"
        for r in result["rows"]]
    missing = result.get("rows_planned", len(result["rows"])) - len(result["rows"])
    lines += ["", f"All completed within the profile's budget: "
                  f"{'yes' if result['all_within_budget'] else 'no'}"
                  + (f" (INCOMPLETE: {missing} rows not run)." if missing else "."), ""]
    return "\n".join(lines)
