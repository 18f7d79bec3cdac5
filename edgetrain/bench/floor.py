"""The floor analysis of a module-wise run: what its heaviest module holds at the peak of a
training step, tensor by tensor (simulated on the meta device by the product's own step,
`edgetrain.budget.estimate.peak_breakdown`), with and without `--recompute`.

Writes `floor_<model>_<input>_b<batch>_<mode>-K<K>.{json,md}` under benchmarks/results/.
"""
from __future__ import annotations

import collections
from pathlib import Path

from edgetrain import __version__
from edgetrain.bench.memory import bench_config
from edgetrain.budget.estimate import estimate_peak, peak_breakdown
from edgetrain.storage.atomic import atomic_write_text
from edgetrain.bench.results import write_result_json
from edgetrain.units import MIB


def floor_report(model: str, input_shape, batch: int, mode: str, modules: int,
                 recompute: list[str], out_dir: Path, split: str = "depth") -> dict:
    """Breakdown of the heaviest module's training peak for each `recompute` setting, beside
    the estimated e2e peak; writes JSON and Markdown to `out_dir`."""
    shape = tuple(input_shape)
    e2e = bench_config(model, shape, batch, "e2e", 1, False)
    e2e_mib = estimate_peak(e2e, shape, 10, n_train=e2e.train_size).peak_bytes / MIB
    rows = []
    for r in recompute:
        cfg = bench_config(model, shape, batch, mode, modules, True, recompute=r, split=split)
        est = estimate_peak(cfg, shape, 10, n_train=cfg.train_size)
        b = peak_breakdown(cfg, shape, 10)
        by_op = collections.Counter()
        for t in b["tensors"]:
            by_op[t["made_by"]] += t["mib"]
        rows.append({"recompute": r, "estimated_peak_mib": round(est.peak_bytes / MIB, 1),
                     "saved_pct_vs_e2e": round(100 * (1 - est.peak_bytes / MIB / e2e_mib), 1),
                     "heaviest_module": b["module"], "step_peak_mib": round(b["peak_mib"], 1),
                     "by_operator_mib": {k: round(v, 1) for k, v in by_op.most_common()},
                     "tensors": [t for t in b["tensors"] if t["mib"] >= 0.5]})
    res = {"benchmark": "floor", "edgetrain_version": __version__, "model": model,
           "input_shape": list(shape), "batch_size": batch, "mode": mode, "modules": modules,
           "split": split,
           "estimated_e2e_peak_mib": round(e2e_mib, 1), "rows": rows,
           "method": "estimate_peak / peak_breakdown: the product's step on the meta device "
                     "under a dispatch mode that tracks every live storage (no compute)"}
    stem = (f"floor_{model}_{'x'.join(map(str, shape))}_b{batch}_{mode}-K{modules}"
            + ("" if split == "depth" else f"-split-{split}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_result_json(out_dir / f"{stem}.json", res)
    atomic_write_text(out_dir / f"{stem}.md", format_floor(res))
    res["paths"] = [str(out_dir / f"{stem}.json"), str(out_dir / f"{stem}.md")]
    return res


def format_floor(res: dict) -> str:
    lines = [f"# Floor analysis: {res['model']} {'x'.join(map(str, res['input_shape']))} "
             f"batch {res['batch_size']}, {res['mode']} K={res['modules']}, "
             f"--split {res.get('split', 'depth')}", "",
             f"Estimated e2e peak: {res['estimated_e2e_peak_mib']} MiB. {res['method']}.", "",
             "| recompute | estimated peak MiB | saved vs e2e | heaviest module | its step peak MiB |",
             "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['recompute']} | {r['estimated_peak_mib']} | {r['saved_pct_vs_e2e']}% | "
                     f"{r['heaviest_module']} | {r['step_peak_mib']} |")
    for r in res["rows"]:
        lines += ["", f"## recompute = {r['recompute']}: alive at the step peak (>= 0.5 MiB)", "",
                  "| made by | shape | dtype | MiB |", "|---|---|---|---:|"]
        lines += [f"| {t['made_by']} | {'x'.join(map(str, t['shape']))} | {t['dtype']} | {t['mib']} |"
                  for t in r["tensors"]]
        lines += ["", "By operator (MiB): " + ", ".join(f"{k} {v}" for k, v in r["by_operator_mib"].items())]
    return "\n".join(lines) + "\n"
