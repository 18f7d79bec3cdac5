"""bf16 against fp32 (`--precision`, issue #17): activation memory, step time, accuracy.

One benchmark run measures, for both precisions:
  (a) memory: the product path (`edgetrain.train`) of one configuration per regime (resnet56,
      3x32x32 synthetic, batch 64, sequential K=4 and e2e) in a fresh child process
      (`edgetrain.bench.memory.run_child`): peak RSS above the child's RSS after imports,
      with the estimator's figure (`estimate_peak`) beside it;
  (b) step time: the same configurations' training steps in a fresh child each (this
      module's `python -m edgetrain.bench.precision` entry point): one step is one batch
      through every module's training step (sequential) or the whole network's (e2e); the
      median over the steps after the warm-up;
  (c) accuracy: digits and Fashion-MNIST, sequential TRGL, over seeds: mean, standard
      deviation, and the paired difference bf16 - fp32 (same seed, same data).
Results: `benchmarks/results/precision.{json,md}` (`edgetrain.bench.results`).

This module does not parse argv (`benchmarks/precision.py` does) and imports torch only in
the functions that need it, so that the children measure their own imports.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from edgetrain import __version__
from edgetrain.bench.memory import bench_config, run_child
from edgetrain.bench.results import write_json_and_markdown
from edgetrain.config import RunConfig
from edgetrain.units import MIB

MARK = "EDGETRAIN-PRECISION-CHILD "
PRECISIONS = ("fp32", "bf16")


def setups(quick: bool, size: str = "full") -> dict:
    """The configurations measured: full, `small` (sized for a CPU without native bf16
    convolutions, where bf16 steps are ~30x slower: resnet20, digits only), or `quick`
    (a smoke check of the whole pipeline)."""
    if size == "small" and not quick:
        return {"model": "resnet20", "input_shape": (3, 32, 32), "batch": 64, "modules": 4,
                "mem_steps": 2, "warmup": 1, "steps": 3, "seeds": 3,
                "accuracy": {"digits": dict(epochs=4, width=8, depth=4)}}
    if quick:
        return {"model": "resnet8", "input_shape": (3, 16, 16), "batch": 32, "modules": 2,
                "mem_steps": 3, "warmup": 1, "steps": 3, "seeds": 1,
                "accuracy": {"digits": dict(train_size=200, epochs=1, width=4, depth=2),
                             "fashion-mnist": dict(train_size=300, test_size=200, epochs=1,
                                                   width=4, depth=2)}}
    return {"model": "resnet56", "input_shape": (3, 32, 32), "batch": 64, "modules": 4,
            "mem_steps": 4, "warmup": 3, "steps": 10, "seeds": 5,
            "accuracy": {"digits": dict(epochs=6, width=16, depth=4),
                         "fashion-mnist": dict(train_size=5000, test_size=2000, epochs=3,
                                               width=16, depth=4)}}


# --------------------------------------------------------------------------- (b) the child
def _child_steps(spec: dict) -> dict:
    import torch  # in the child only

    from edgetrain.method.loop import make_trainer, train_step  # imports torch: in the child
    from edgetrain.method.precision import autocast, compute_input  # imports torch: in the child
    from edgetrain.method.stage import whole_network  # imports torch: in the child
    from edgetrain.regimes.run import build_run  # imports torch: in the child
    torch.set_num_threads(int(spec["threads"]))
    cfg = RunConfig.from_dict(spec["cfg"])
    run = build_run(cfg)
    e2e = cfg.mode == "e2e"
    stages = [whole_network(run.net, run.stages[-1].head)] if e2e else run.stages
    trainers = [make_trainer(st, cfg, k, len(stages), 10**6, transport=False if e2e else None)
                for k, st in enumerate(stages)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, *run.data.input_shape, generator=g)  # (B, C, H, W)
    y = torch.randint(0, run.data.num_classes, (cfg.batch_size,), generator=g)
    inputs = [x]  # each module's input: the frozen prefix's output, computed once
    with torch.no_grad(), autocast(cfg.precision, x.device):
        for st in stages[:-1]:
            inputs.append(st.eval().features(compute_input(inputs[-1], cfg.precision)).float())
    times, cpu = [], []
    for _ in range(int(spec["warmup"]) + int(spec["steps"])):
        t0, c0 = time.perf_counter(), time.process_time()
        for tr, xin in zip(trainers, inputs):
            train_step([tr], xin, y, cfg.label_smoothing, cfg.transport_scaling, cfg.precision)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    w = int(spec["warmup"])
    return {"ok": True, "step_s": times[w:], "step_cpu_s": cpu[w:],
            "threads": torch.get_num_threads()}


def child_main(spec: dict) -> dict:
    """Time one configuration's steps in this (fresh) process; never raises."""
    try:
        return _child_steps(spec)
    except BaseException as e:  # noqa: BLE001 - report any failure as a row
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}


def time_child(spec: dict, timeout_s: float = 1800) -> dict:
    """Run `_child_steps(spec)` in a fresh Python process."""
    try:
        p = subprocess.run([sys.executable, "-m", "edgetrain.bench.precision"],
                           input=json.dumps(spec), capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = (p.stderr.strip().splitlines() or [""])[-1][:300]
        return {"ok": False, "error": f"child exited with code {p.returncode}: {tail}"}
    return json.loads(lines[-1][len(MARK):])


# --------------------------------------------------------------------------- (a) and (b)
def _cfg(s: dict, mode: str, precision: str) -> RunConfig:
    return bench_config(s["model"], s["input_shape"], s["batch"], mode, s["modules"], True,
                        steps=s["mem_steps"], precision=precision, device="cpu")


def memory_and_time(s: dict, tmp: Path, threads: int) -> list[dict]:
    """One row per (regime, precision): measured and predicted memory, median step time."""
    from edgetrain.budget.estimate import estimate_peak  # imports torch: the parent only
    rows = []
    for mode in ("sequential", "e2e"):
        for precision in PRECISIONS:
            cfg = _cfg(s, mode, precision)
            mem = run_child({"cfg": cfg.to_dict(), "out_dir": str(tmp / f"{mode}-{precision}"),
                             "threads": threads})
            steps = time_child({"cfg": cfg.to_dict(), "threads": threads,
                                "warmup": s["warmup"], "steps": s["steps"]})
            pred = estimate_peak(cfg, cfg.input_shape, 10, n_train=cfg.train_size)
            measured = (mem["peak_rss_bytes"] - mem["import_rss_bytes"]) if mem.get("ok") else None
            rows.append({
                "mode": mode, "modules": cfg.modules, "precision": precision,
                "ok": bool(mem.get("ok") and steps.get("ok")),
                "error": mem.get("error") or steps.get("error"),
                "measured_mib": None if measured is None else round(measured / MIB, 2),
                "predicted_mib": round(pred.peak_bytes / MIB, 2),
                "predicted_train_step_mib": round(pred.train_step_bytes / MIB, 2),
                "predicted_activations_mib": round(pred.activations_bytes / MIB, 2),
                "step_s_median": (statistics.median(steps["step_s"]) if steps.get("ok")
                                  else None),
                "step_s": steps.get("step_s")})
    for r in rows:  # bf16 against its fp32 twin
        twin = next(t for t in rows if t["mode"] == r["mode"] and t["precision"] == "fp32")
        for key in ("measured_mib", "predicted_mib", "predicted_activations_mib",
                    "step_s_median"):
            a, b = twin.get(key), r.get(key)
            r[f"{key}_vs_fp32"] = round(b / a, 3) if a and b is not None else None
    return rows


# --------------------------------------------------------------------------- (d) auto
AUTO_JOB = dict(model="resnet18", input_shape=(3, 32, 32), batch=64)  # torchvision, CIFAR stem
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16", "asimd", "sve")


def cpu_description() -> dict:
    """The CPU the row was measured on: its flags that decide bf16, and the decision."""
    import torch  # the machine's description

    from edgetrain.method.precision import (cpu_flags,  # imports torch: the parent only
                                            detect_bf16, read_cpuinfo)
    info = read_cpuinfo() or ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                 if ln.split(":")[0].strip() == "model name"), platform.processor())
    check = detect_bf16(torch.device("cpu"))
    return {"model_name": name, "flags": sorted(set(ISA_FLAGS) & cpu_flags(info)),
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": check.native, "reason": check.reason}


def auto_rows(threads: int, rounds: int = 3, warmup: int = 2, steps: int = 5) -> dict:
    """`--precision auto` against fp32 on AUTO_JOB (e2e, SGD): the median step of each
    precision in fresh children, `rounds` paired rounds (fp32 then auto); per-sample ms."""
    import torch  # the parent only

    from edgetrain.method.precision import resolve_precision  # imports torch: the parent only
    j = AUTO_JOB
    base = bench_config(j["model"], j["input_shape"], j["batch"], "e2e", 1, False,
                        steps=warmup + steps, device="cpu")
    auto_cfg, line = resolve_precision(RunConfig.from_dict({**base.to_dict(), "precision": "auto",
                                                            "cache_dtype": None}),
                                       torch.device("cpu"))
    cfgs = {"fp32": base, "auto": auto_cfg}
    per = {name: [] for name in cfgs}
    cpu = {name: [] for name in cfgs}
    load = os.getloadavg()[0]
    for _ in range(rounds):
        for name, cfg in cfgs.items():
            r = time_child({"cfg": cfg.to_dict(), "threads": threads, "warmup": warmup,
                            "steps": steps})
            if not r.get("ok"):
                return {"ok": False, "error": r.get("error")}
            per[name].append(statistics.median(r["step_s"]) / j["batch"] * 1000)
            cpu[name].append(statistics.median(r["step_cpu_s"]) / j["batch"] * 1000)
    ratios = [a / b for a, b in zip(per["fp32"], per["auto"])]
    cpu_ratios = [a / b for a, b in zip(cpu["fp32"], cpu["auto"])]
    return {"ok": True, "job": {**j, "mode": "e2e", "optimizer": base.optimizer},
            "auto_resolved": auto_cfg.precision, "auto_line": line, "cpu": cpu_description(),
            "rounds": rounds, "steps": steps, "warmup": warmup, "threads": threads,
            "load_before": load, "load_after": os.getloadavg()[0],
            "ms_per_sample": per, "speedup_median": statistics.median(ratios),
            "speedup_rounds": ratios, "cpu_ms_per_sample": cpu,
            "cpu_speedup_median": statistics.median(cpu_ratios), "cpu_speedup_rounds": cpu_ratios}


# --------------------------------------------------------------------------- (c) accuracy
def accuracy_cfg(data: str, precision: str, seed: int, kw: dict) -> RunConfig:
    """Sequential TRGL, K=2 kmresnet: the product's module-wise path, one lap."""
    return RunConfig(data=data, model="kmresnet", modules=2, mode="sequential", seed=seed,
                     precision=precision, device="cpu", **kw)


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def accuracy(s: dict, seeds: int, tmp: Path) -> list[dict]:
    """Per data set: best test accuracy (depth chosen on validation) per seed and precision,
    its mean and std, and the paired difference bf16 - fp32."""
    from edgetrain.regimes.schedule import train  # imports torch: the parent only
    rows = []
    for data, kw in s["accuracy"].items():
        acc = {p: [] for p in PRECISIONS}
        for seed in range(seeds):
            for p in PRECISIONS:
                m = train(accuracy_cfg(data, p, seed, kw), tmp / f"acc-{data}-{p}-{seed}")
                acc[p].append(m["best_test_acc"])
        diff = [b - a for a, b in zip(acc["fp32"], acc["bf16"])]
        rows.append({"data": data, "config": kw, "seeds": list(range(seeds)), "acc": acc,
                     **{p: _stats(acc[p]) for p in PRECISIONS}, "bf16_minus_fp32": _stats(diff)})
    return rows


# --------------------------------------------------------------------------- the benchmark
def run_precision(out_dir: Path, seeds: int | None = None, quick: bool = False,
                  threads: int = 2, size: str = "full",
                  parts: tuple[str, ...] = ("memory", "accuracy")) -> dict:
    """Measure (a) and (b) (part `memory`), (c) (part `accuracy`) and (d) (part `auto`:
    `auto_rows`), see the module docstring; write precision[-small][-PART].{json,md} (PART
    when only one part runs)."""
    import torch  # the machine's description

    from edgetrain.method.precision import (bf16_supported,  # imports torch: the parent only
                                            detect_bf16)
    s = setups(quick, size)
    seeds = seeds or s["seeds"]
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgetrain-precision-") as tmp:
        rows = memory_and_time(s, Path(tmp), threads) if "memory" in parts else []
        acc = accuracy(s, seeds, Path(tmp)) if "accuracy" in parts else []
    auto = auto_rows(threads) if "auto" in parts else None
    result = {"benchmark": "precision", "edgetrain_version": __version__, "quick": quick,
              "torch": torch.__version__, "machine": platform.machine(),
              "processor": platform.processor(), "threads": threads,
              "cpu_bf16_autocast": bf16_supported(torch.device("cpu")),
              "cpu_native_bf16": detect_bf16(torch.device("cpu")).native,
              "setup": {k: v for k, v in s.items() if k != "accuracy"},
              "memory_and_time": rows, "accuracy": acc, "auto": auto,
              "load_avg": list(os.getloadavg()),
              "wall_s": round(time.perf_counter() - t0, 1)}
    stem = ("precision" + ("-quick" if quick else "") + ("-small" if size == "small" else "")
            + (f"-{parts[0]}" if len(parts) == 1 else ""))
    result["utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    return write_json_and_markdown(result, out_dir, stem, markdown)


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def auto_markdown(a: dict | None) -> list[str]:
    """The `--precision auto` section (part `auto`), or nothing."""
    if not a:
        return []
    if not a.get("ok"):
        return ["## --precision auto", "", f"error: {a.get('error')}", ""]
    j, c, ms = a["job"], a["cpu"], a["ms_per_sample"]
    shape = "x".join(map(str, j["input_shape"]))
    rows = [f"| {name} | " + " / ".join(f"{v:.2f}" for v in ms[name]) + " | "
            + " / ".join(f"{v:.2f}" for v in a["cpu_ms_per_sample"][name]) + " |" for name in ms]
    return ["## --precision auto against fp32", "",
            f"{j['model']} (CIFAR stem) {shape}, batch {j['batch']}, e2e, "
            f"{j['optimizer'].upper()}, training steps in fresh processes, median of "
            f"{a['steps']} steps after {a['warmup']} warm-up per process, {a['rounds']} paired "
            f"rounds, {a.get('threads', '?')} thread(s), load average "
            f"{a.get('load_before', float('nan')):.2f} -> {a.get('load_after', float('nan')):.2f}. "
            f"CPU: {c['model_name']}, flags {', '.join(c['flags'])}, ATen "
            f"{c['aten_capability']}. auto resolved to **{a['auto_resolved']}** "
            f"({c['reason']}).", "",
            "| precision | wall ms per training sample, per round | CPU ms per sample, per "
            "round |", "|---|---|---|", *rows, "",
            f"auto is **{a['speedup_median']:.2f}x** as fast as fp32 in wall time (median of the "
            "rounds' ratios: " + ", ".join(f"{r:.2f}" for r in a["speedup_rounds"]) + "), "
            f"**{a['cpu_speedup_median']:.2f}x** in CPU time (" +
            ", ".join(f"{r:.2f}" for r in a["cpu_speedup_rounds"]) + ").", ""]


def markdown(res: dict) -> str:
    """The result as a Markdown page."""
    lines = [f"# --precision bf16 against fp32{' (quick smoke run)' if res['quick'] else ''}",
             "", f"edgetrain {res['edgetrain_version']}, torch {res['torch']}, "
             f"{res['machine']}, {res['threads']} threads, CPU bf16 autocast: "
             f"{res['cpu_bf16_autocast']}, native bf16 convolutions (oneDNN): "
             f"{res['cpu_native_bf16']}; {res['wall_s']} s in all.", "",
             *auto_markdown(res.get("auto"))]
    if res["memory_and_time"]:
        lines += memory_markdown(res)
    if res["accuracy"]:
        lines += accuracy_markdown(res)
    return "\n".join(lines) + "\n"


def memory_markdown(res: dict) -> list[str]:
    """The memory and step-time section (part `memory`)."""
    s = res["setup"]
    lines = [f"## Memory and step time ({s['model']}, {'x'.join(map(str, s['input_shape']))} "
             f"synthetic, batch {s['batch']})", "",
             "Measured: peak RSS above the child's RSS after imports (fresh process, product "
             "path). Predicted: `estimate_peak` (tensors). Step: one batch through every "
             f"module's training step, median of {s['steps']} after {s['warmup']} warm-up.", "",
             "| regime | precision | measured MiB | predicted MiB | predicted activations MiB "
             "| step s | measured / fp32 | predicted / fp32 | step / fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["memory_and_time"]:
        regime = r["mode"] if r["mode"] == "e2e" else f"{r['mode']} K={r['modules']}"
        lines.append(
            f"| {regime} | {r['precision']} | {_fmt(r['measured_mib'])} | "
            f"{_fmt(r['predicted_mib'])} | {_fmt(r['predicted_activations_mib'])} | "
            f"{_fmt(r['step_s_median'], '.3f')} | {_fmt(r['measured_mib_vs_fp32'], '.3f')} | "
            f"{_fmt(r['predicted_mib_vs_fp32'], '.3f')} | "
            f"{_fmt(r['step_s_median_vs_fp32'], '.3f')} |"
            + (f" error: {r['error']}" if r.get("error") else ""))
    return lines


def accuracy_markdown(res: dict) -> list[str]:
    """The accuracy section (part `accuracy`)."""
    lines = ["", "## Accuracy (sequential TRGL, K=2 kmresnet; best test accuracy, depth "
              "chosen on validation)", "",
              "| data | config | seeds | fp32 mean +- std | bf16 mean +- std | "
              "bf16 - fp32 (paired) mean +- std |", "|---|---|---|---|---|---|"]
    for a in res["accuracy"]:
        cfg = ", ".join(f"{k}={v}" for k, v in a["config"].items())
        d = a["bf16_minus_fp32"]
        lines.append(f"| {a['data']} | {cfg} | {len(a['seeds'])} | "
                     f"{a['fp32']['mean']:.4f} +- {a['fp32']['std']:.4f} | "
                     f"{a['bf16']['mean']:.4f} +- {a['bf16']['std']:.4f} | "
                     f"{d['mean']:+.4f} +- {d['std']:.4f} |")
    return lines


if __name__ == "__main__":  # the step-time child: spec as JSON on stdin
    print(MARK + json.dumps(child_main(json.loads(sys.stdin.read()))), flush=True)
