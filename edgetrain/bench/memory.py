"""`edgetrain bench memory`: peak memory of every regime against end-to-end (the paper's Table 5).

Each configuration runs the product path, `edgetrain.train`, on synthetic data for a
few optimizer steps in a fresh child process (`run_child`), which reports its resident set
after importing torch and edgetrain, its per-phase peaks from `metrics.json` (VmHWM reset per
phase; on CUDA `max_memory_allocated` / `max_memory_reserved`) and its peak address space.
Measured memory is the child's peak minus its own figure after imports; the analytic
prediction (`edgetrain.budget.estimate.estimate_peak`) sits next to it in every row.

This module is also the child's entry point (`python -m edgetrain.bench.memory`, spec as JSON
on stdin); it imports nothing heavy at module level so that a memory cap set by the child
(`rlimit_as_bytes`, see `edgetrain.bench.cap`) applies to the torch import too. It does not
parse argv: `edgetrain bench memory` and `benchmarks/memory.py` do.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable

from edgetrain import __version__
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.bench.results import write_result_json
from edgetrain.units import MIB

MARK = "EDGETRAIN-CHILD-RESULT "
METHODS = {True: "TRGL", False: "VanGL"}


# --------------------------------------------------------------------------- the child
def _child_measure(spec: dict) -> dict:
    import torch  # after the child's cap (child_main): the torch import counts under it

    from edgetrain import measure as memory  # imports torch: after the cap
    from edgetrain.regimes import schedule  # imports torch: after the cap
    torch.set_num_threads(int(spec.get("threads", 2)))
    res = {"import_rss_bytes": memory.current_rss_bytes(),
           "import_peak_rss_bytes": memory.peak_rss_bytes(),
           "import_address_space_bytes": memory.peak_address_space_bytes()}
    cfg = RunConfig.from_dict(spec["cfg"])
    t0 = time.perf_counter()
    metrics = schedule.train(cfg, Path(spec["out_dir"]))
    res.update(ok=True, step_s=metrics["timings"].get("step_s"), wall_s=time.perf_counter() - t0, phases=metrics.get("memory", {}),
               peak_rss_bytes=int(metrics["peak_rss_mib"] * MIB),
               peak_address_space_bytes=memory.peak_address_space_bytes(),
               max_resident_modules=metrics.get("max_resident_modules"),
               device=metrics.get("device"),
               cuda_name=torch.cuda.get_device_name() if cfg.device == "cuda" else None)
    return res


def child_main(spec: dict) -> dict:
    """Run one configuration in this (fresh) process; never raises, returns a result dict."""
    cap = spec.get("rlimit_as_bytes")
    if cap:
        resource.setrlimit(resource.RLIMIT_AS, (int(cap), int(cap)))
    try:
        from edgetrain.measure import compact_malloc  # imports torch: after the cap
        if spec.get("compact_malloc", True):  # as the CLI does
            compact_malloc()
        return _child_measure(spec)
    except BaseException as e:  # noqa: BLE001 - out-of-memory surfaces as many types
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}


def run_child(spec: dict, timeout_s: float = 3600) -> dict:
    """Run `spec` ({cfg, out_dir, threads, rlimit_as_bytes}) in a fresh Python process."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "edgetrain.bench.memory"], input=json.dumps(spec),
                           capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s} s", "child_wall_s": timeout_s}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if lines:
        res = json.loads(lines[-1][len(MARK):])
    else:  # killed, or died before it could report
        tail = (p.stderr.strip().splitlines() or [""])[-1][:300]
        res = {"ok": False, "error": f"child exited with code {p.returncode}: {tail}"}
    res["child_wall_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- configurations
def bench_config(model: str, input_shape, batch: int, mode: str, modules: int, transport: bool,
                 steps: int = 2, device: str = "cpu", width: int | None = None,
                 depth: int | None = None, cache_dir: str | None = None, **kw):
    """The RunConfig of one configuration: synthetic data, `steps` optimizer steps per module
    and lap (multilap: 2 laps), no augmentation cost beyond the product's default."""
    n_train = steps * batch
    size = math.ceil(n_train / 0.9) + 1
    laps = 2 if mode == "multilap" else 1
    return RunConfig(data="synthetic", input_shape=tuple(input_shape), synthetic_size=size,
                     train_size=n_train, val_fraction=0.1, model=model, width=width, depth=depth,
                     modules=1 if mode == "e2e" else modules, mode=mode, laps=laps, epochs=laps,
                     transport=transport, batch_size=batch, device=device, cache_dir=cache_dir, **kw)


def _configs(modes, modules, transports, recompute: str = "none",
             ckpt_segments: list[int] = ()) -> list[tuple[str, int, bool, str]]:
    """(mode, K, transport, recompute) of every row: e2e, then e2e with checkpointing over
    each of `ckpt_segments` segments (the alternative a PyTorch user would pick; K holds S),
    then every module-wise regime, K and method, also with `recompute` when it is set."""
    out = [("e2e", 1, False, "none")] if "e2e" in modes else []
    out += [("e2e", s, False, f"segments:{s}") for s in ckpt_segments]
    for k in modules:
        for mode in modes:
            if mode != "e2e":
                for r in dict.fromkeys(["none", recompute]):
                    out += [(mode, k, t, r) for t in transports]
    return out


def ckpt_segment_counts(n_blocks: int, modules: list[int]) -> list[int]:
    """S = round(sqrt(blocks)) (the classic sqrt(n) checkpointing) and S = each K."""
    return sorted({max(1, round(math.sqrt(n_blocks))), *(k for k in modules if k <= n_blocks)})


# --------------------------------------------------------------------------- one row
def _measured_bytes(res: dict, device: str) -> int | None:
    """The peak of training tensors: CUDA max allocated, or peak RSS minus RSS after imports."""
    if not res.get("ok"):
        return None
    if device == "cuda":
        return int(max(p.get("cuda_max_allocated_mib", 0) for p in res["phases"].values()) * MIB)
    return res["peak_rss_bytes"] - res["import_rss_bytes"]


def _phases_mib(res: dict, device: str) -> dict:
    key = "cuda_max_allocated_mib" if device == "cuda" else "peak_rss_mib"
    base = 0 if device == "cuda" else res["import_rss_bytes"] / MIB
    return {name: round(p.get(key, 0) - base, 2) for name, p in res.get("phases", {}).items()}


def _row(mode, k, transport, recompute, cfg, res: dict, pred, device: str, warm_extra: int
         ) -> dict:
    """One table row; `warm_extra` is the runtime's warm-up RSS above its import figure."""
    measured = _measured_bytes(res, device)
    tensors = None if measured is None else measured - (0 if device == "cuda" else warm_extra)
    predicted = (pred.peak_bytes if device != "cuda"  # on CUDA: the data, prefetch queue and
                 else pred.train_step_bytes - pred.dataset_bytes - pred.prefetch_bytes)  # cache stay on CPU
    path = ("schedule.train (out-of-core, one module resident)"
            if mode in ("sequential", "multilap") and res.get("max_resident_modules") == 1
            else "schedule.train")
    method = ("E2E+ckpt" if recompute != "none" else "E2E") if mode == "e2e" else METHODS[transport]
    row = {"mode": mode, "modules": k, "method": method, "recompute": recompute, "split": cfg.split,
           "step_s": res.get("step_s"), "transport": transport, "ok": bool(res.get("ok")), "error": res.get("error"),
           "measured_path": path, "max_resident_modules": res.get("max_resident_modules"),
           "measured_mib": None if measured is None else round(measured / MIB, 2),
           "measured_tensors_mib": None if tensors is None else round(tensors / MIB, 2),
           "predicted_mib": round(predicted / MIB, 2),
           "predicted_train_step_mib": round(pred.train_step_bytes / MIB, 2),
           "ratio_measured_predicted": None if tensors is None else round(tensors / predicted, 3),
           "import_rss_mib": round(res.get("import_rss_bytes", 0) / MIB, 2),
           "peak_rss_mib": round(res.get("peak_rss_bytes", 0) / MIB, 2),
           "phases_mib": _phases_mib(res, device) if res.get("ok") else {},
           "wall_s": round(res.get("child_wall_s", 0), 2), "prediction": pred.to_dict()}
    row["prediction"].pop("per_module", None)
    return row


def _twin(rows: list[dict], r: dict) -> dict | None:
    """The row `r`'s step time is compared with: e2e for e2e+ckpt and for plain module-wise
    rows; the same regime, K and method without recomputation for a recomputed row."""
    if r["mode"] == "e2e" or r["recompute"] == "none":
        return next((q for q in rows if q["mode"] == "e2e" and q["recompute"] == "none"), None)
    return next((q for q in rows if (q["mode"], q["modules"], q["transport"], q["recompute"])
                 == (r["mode"], r["modules"], r["transport"], "none")), None)


def _add_savings(rows: list[dict]) -> None:
    for r in rows:
        t = _twin(rows, r)
        r["step_time_ratio"] = (round(r["step_s"] / t["step_s"], 3)
                                if t is not None and t is not r and r.get("step_s")
                                and t.get("step_s") else None)
    e2e = next((r for r in rows if r["mode"] == "e2e" and r["recompute"] == "none" and r["ok"]),
               None)
    for r in rows:
        r["saved_pct"] = (round(100 * (1 - r["measured_mib"] / e2e["measured_mib"]), 1)
                          if e2e and r["ok"] else None)
        r["saved_pct_tensors"] = (
            round(100 * (1 - r["measured_tensors_mib"] / e2e["measured_tensors_mib"]), 1)
            if e2e and r["ok"] else None)
        r["saved_pct_predicted"] = (round(100 * (1 - r["predicted_mib"] / e2e["predicted_mib"]), 1)
                                    if e2e else None)


# --------------------------------------------------------------------------- the benchmark
def bench_memory(model: str, input_shape, batch: int, modules: list[int], modes: list[str],
                 transports=(True, False), device: str = "cpu", steps: int = 2,
                 width: int | None = None, depth: int | None = None, threads: int = 2,
                 out_dir: Path = Path("benchmarks/results"), timeout_s: float = 3600,
                 log: Callable[[str], None] | None = None, recompute: str = "none",
                 ckpt_baseline: bool = True, split: str = "depth", tag: str = "") -> dict:
    """Measure every (regime, K, transport) configuration in a fresh process; write JSON + PNG.

    Args:
        model, input_shape, batch, width, depth: the network and its input.
        modules: the K values; modes: regimes (e2e is measured once, as the reference).
        transports: True (TRGL) and/or False (VanGL).
        device: "cpu" (measured: peak RSS minus RSS after imports) or "cuda"
            (measured: `torch.cuda.max_memory_allocated`, reset per phase).
        steps: optimizer steps per module and lap.
        out_dir: where `memory_<...>.json` and `.png` go.
        recompute: also measure every module-wise row with this `--recompute`.
        ckpt_baseline: also measure e2e with `torch.utils.checkpoint` over S segments of
            blocks, S = round(sqrt(blocks)) and S = each K (with e2e in `modes`).
        split: `--split` of every module-wise row (depth: equal blocks per module;
            memory: balanced training peaks, what the planner picks).
        tag: a suffix of the result's file names (`memory_<...>_<device>-<tag>`).

    Returns:
        The result dict (also written as JSON), with `json_path` and `png_path`.
    """
    from edgetrain.budget.estimate import estimate_peak  # imports torch: in the parent only
    from edgetrain.measure import runtime_rss_bytes  # imports torch: in the parent only
    rt = runtime_rss_bytes()
    warm_extra = rt["warm_rss_bytes"] - rt["import_rss_bytes"]
    if device == "cuda":
        import torch  # in the parent only: the child imports it under its cap
        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but CUDA is not available")
    if steps < 1 or threads < 1:
        raise UserError("--steps and --threads must be >= 1")
    segs = []
    if ckpt_baseline and "e2e" in modes:
        from edgetrain.models import create_model  # imports torch: in the parent only
        n_blocks = len(create_model(model, tuple(input_shape), 10, width, depth).blocks)
        segs = ckpt_segment_counts(n_blocks, list(modules))
    plan = [(m, k, t, r, bench_config(model, input_shape, batch, m, 1 if m == "e2e" else k, t,
                                      steps, device, width, depth, recompute=r,
                                      split="depth" if m == "e2e" else split))
            for m, k, t, r in _configs(modes, modules, transports, recompute, segs)]
    deepest = max(plan, key=lambda p: p[1])[4]
    estimate_peak(deepest, tuple(input_shape), 10)  # a bad model or K fails here, before any run
    rows = []
    log = log or (lambda line: None)
    log(TABLE_HEADER)
    with tempfile.TemporaryDirectory(prefix="edgetrain-bench-memory-") as tmp:
        for i, (mode, k, t, r, cfg) in enumerate(plan):
            cfg.cache_dir = f"{tmp}/cache{i}"
            pred = estimate_peak(cfg, tuple(input_shape), 10, n_train=cfg.train_size)
            res = run_child({"cfg": cfg.to_dict(), "out_dir": f"{tmp}/run{i}", "threads": threads},
                            timeout_s)
            rows.append(_row(mode, k, t, r, cfg, res, pred, device, warm_extra))
            log(format_row(rows[-1]))
            result = _result(model, input_shape, batch, modules, modes, device, steps, threads,
                             rows, res, rt, complete=i == len(plan) - 1)
            result.update(split=split, tag=tag)
            write_result(result, Path(out_dir))  # after every row: a long run killed keeps its rows
    return result


def _result(model, input_shape, batch, modules, modes, device, steps, threads, rows, last, rt,
            complete: bool) -> dict:
    import torch  # in the parent only: the child imports it under its cap

    _add_savings(rows)
    name = (last.get("cuda_name") or "cuda") if device == "cuda" else "cpu"
    return {"benchmark": "memory", "complete": complete, "edgetrain_version": __version__,
            "torch_version": torch.__version__,
            "runtime_import_rss_mib": round(rt["import_rss_bytes"] / MIB, 2),
            "model": model, "input_shape": list(input_shape), "batch_size": batch,
            "modules": list(modules), "modes": list(modes), "device": device, "device_name": name,
            "steps_per_module": steps, "threads": threads, "data": "synthetic",
            "runtime_baseline_mib": round(rt["warm_rss_bytes"] / MIB, 2),
            "measured_is": ("torch.cuda.max_memory_allocated, max over phases" if device == "cuda"
                            else "peak RSS (VmHWM) of the child minus its RSS after imports"),
            "measured_tensors_is": ("same as measured" if device == "cuda" else
                                    "measured minus the runtime's warm-up RSS (runtime_baseline "
                                    "minus runtime_import, from a separate fresh process)"),
            "ratio_is": "measured_tensors / predicted",
            "step_time_ratio_is": ("seconds in optimizer steps (timings.step_s) over those of e2e "
                                   "for e2e, e2e+ckpt and plain module-wise rows; over the same "
                                   "regime, K and method without recomputation for a recomputed "
                                   "module-wise row"),
            "e2e_ckpt_is": ("e2e with torch.utils.checkpoint over S equal segments of blocks "
                            "(--recompute segments:S); the K column holds S"),
            "predicted_is": "edgetrain.budget.estimate.estimate_peak(...).peak_bytes (tensors only)",
            "paper_table5_parallel_trgl_saved_pct": {"4": 24, "8": 48, "16": 58},
            "rows": rows, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def result_stem(result: dict) -> str:
    shape = "x".join(str(v) for v in result["input_shape"])
    dev = "".join(c if c.isalnum() or c in "-." else "-" for c in result["device_name"])
    tag = f"-{result['tag']}" if result.get("tag") else ""
    return f"memory_{result['model']}_{shape}_b{result['batch_size']}_{dev}{tag}"


def write_result(result: dict, out_dir: Path) -> dict:
    """Write the JSON and the PNG bar chart; returns `result` with their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result)
    result["json_path"] = str(out_dir / f"{stem}.json")
    result["png_path"] = plot_savings(result, out_dir / f"{stem}.png")
    write_result_json(Path(result["json_path"]), result)
    return result


def plot_savings(result: dict, path: Path) -> str | None:
    """Grouped bar chart of memory saved vs e2e per K and regime (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result["rows"] if r["method"] != "E2E" and r["saved_pct"] is not None]
    series = sorted({(r["mode"], r["method"], r.get("recompute", "none")) for r in rows})
    ks = sorted({r["modules"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(series), 1)
    for i, (mode, method, rec) in enumerate(series):
        vals = [next((r["saved_pct"] for r in rows if r["modules"] == k and r["mode"] == mode
                      and r["method"] == method and r.get("recompute", "none") == rec), 0)
                for k in ks]
        label = f"{mode} {method}" + ("" if rec == "none" or mode == "e2e" else f" {rec}")
        ax.bar([j + i * width for j in range(len(ks))], vals, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ks))], [f"K={k}" for k in ks])
    ax.set_xlabel("K modules (e2e+ckpt: S segments)")
    ax.set_ylabel("memory saved vs end-to-end (%)")
    ax.set_title(f"{result['model']} {'x'.join(map(str, result['input_shape']))} "
                 f"batch {result['batch_size']} ({result['device_name']})")
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def format_row(r: dict) -> str:
    """One line of the table."""
    def f(v, spec):
        return format(v, spec) if v is not None else "-"
    return (f"{r['mode']:<10} {r['modules']:>3} {r['method']:<8} {r.get('recompute', 'none'):<11} "
            f"{f(r['measured_mib'], '>10.1f')} "
            f"{f(r['measured_tensors_mib'], '>10.1f')} "
            f"{f(r['predicted_mib'], '>10.1f')} {f(r['ratio_measured_predicted'], '>6.2f')} "
            f"{f(r.get('saved_pct'), '>7.1f')} {f(r.get('saved_pct_tensors'), '>7.1f')} "
            f"{f(r.get('saved_pct_predicted'), '>7.1f')} {f(r.get('step_time_ratio'), '>6.2f')} "
            f"{'ok' if r['ok'] else 'FAILED: ' + str(r['error'])}")


TABLE_HEADER = (f"{'mode':<10} {'K':>3} {'meth.':<8} {'recompute':<11} {'meas_MiB':>10} "
                f"{'tens_MiB':>10} {'pred_MiB':>10} {'t/p':>6} {'saved%':>7} {'tens%':>7} "
                f"{'pred%':>7} {'step×':>6} status")


def format_table(result: dict) -> str:
    """The Table-5-like table: memory saved as % of end-to-end per K and regime."""
    return "\n".join([TABLE_HEADER] + [format_row(r) for r in result["rows"]])


if __name__ == "__main__":
    _res = child_main(json.loads(sys.stdin.read()))
    print(MARK + json.dumps(_res), flush=True)
