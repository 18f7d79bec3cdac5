"""Benchmark: the accuracy cost of the light head (`--head dgl-light`) beside the DGL head.

The same sequential TRGL run (network, data, seeds, every other setting) is trained with
`--head dgl` and with `--head dgl-light` forced for every module. On the default kmresnet
width (64 channels, 128 after the midpoint) `--head auto` picks `dgl`, since the light head
is meant for maps over `LIGHT_ABOVE` channels; forcing it here measures what reducing the
channels before the head's 3x3 conv costs (to `light_width(c)` = c/4, at least 16: the same
quarter the light head keeps on ResNet-50's 2048-channel maps, bounded there to 128).

Per data set it reports the best-depth test accuracy (depth chosen on validation, never on
test) of every seed, mean and standard deviation per head, and the paired difference
light - dgl per seed (same seed: same data split, initialisation of the shared blocks and
batch order) with its mean, standard deviation and 95% confidence interval; and each head's
parameters per module. Runs go through the product path (`research.accuracy.accuracy.run_one`).

Results are rewritten after every run (`head_cost.json` and `head_cost.md`), so a stopped
benchmark keeps what finished and a rerun with the same settings skips it (resumable).
This file does not parse argv or read the environment (`research/head_cost/run.py` does).
"""
from __future__ import annotations

import json
from pathlib import Path
import platform
import time
from typing import Callable

import torch

from edgetrain import __version__
from research.accuracy.accuracy import run_one, torch_threads
from research.accuracy.accuracy_report import mean_ci95
from edgetrain.bench.results import write_json_and_markdown
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.method.split import build_stages, make_bounds
from edgetrain.models import create_model
from edgetrain.regimes.run import load_data

HEADS = ("dgl", "dgl-light")  # the reference and the default candidate
STEM = "head_cost"  # results of dgl-light; another candidate C writes head_cost-C.*
# Sequential TRGL at the cpu accuracy grid's tuned sequential settings (lr 0.1, tau 10,
# midpoint schedule; `research.accuracy.accuracy.cpu_grid`), one block per module, at the
# model's default width (64).
BASE = dict(model="kmresnet", width=None, depth=4, modules=4, mode="sequential",
            transport=True, lr=0.1, tau=10.0, tau_schedule="midpoint", batch_size=64)
# per data set: RunConfig fields (sizes and epochs sized for one CPU thread)
DATASETS = {"digits": dict(epochs=8),
            "fashion-mnist": dict(train_size=5000, epochs=2, val_fraction=0.1,
                                  test_size=2000)}


def stem_of(candidate: str, reference: str = "dgl", model: str | None = None) -> str:
    """head_cost (dgl-light vs dgl), head_cost-C (C vs dgl) or head_cost-C-vs-R, with
    `-on-MODEL` for another model than BASE's."""
    stem = STEM if candidate == "dgl-light" else f"{STEM}-{candidate}"
    if reference != "dgl":
        stem += f"-vs-{reference}"
    return stem if model in (None, BASE["model"]) else f"{stem}-on-{model}"


def run_config(base: dict, data_fields: dict, dataset: str, head: str, seed: int,
               device: str = "auto") -> RunConfig:
    """The RunConfig of one run."""
    return RunConfig(**{**base, **data_fields, "data": dataset, "head": head, "seed": seed,
                        "device": device})


def head_params(cfg: RunConfig) -> list[int]:
    """Parameters of each module's head for `cfg` (built on the meta device: no compute)."""
    data = load_data(cfg)
    net = create_model(cfg.model, data.input_shape, data.num_classes, cfg.width, cfg.depth)
    net.to("meta")
    sample = torch.empty(2, *data.input_shape, device="meta")
    stages = build_stages(net, make_bounds(net, cfg.modules, cfg.split, sample), cfg.head,
                          data.num_classes, sample)
    return [sum(p.numel() for p in st.head.parameters()) for st in stages]


def summarize(runs: list[dict], heads: tuple[str, str] = HEADS) -> dict:
    """Per data set: mean/std per head of best-depth test accuracy and the paired
    candidate - dgl difference over the seeds that have both (the key keeps its first
    name, `diff_light_minus_dgl`, whatever the candidate)."""
    out = {}
    ref, cand = heads
    for d in dict.fromkeys(r["dataset"] for r in runs):
        acc = {h: {r["seed"]: r["best_test_acc"] for r in runs
                   if r["dataset"] == d and r["head"] == h} for h in heads}
        seeds = sorted(set(acc[ref]) & set(acc[cand]))
        diffs = [acc[cand][s] - acc[ref][s] for s in seeds]
        out[d] = {"heads": {h: mean_ci95(list(acc[h].values())) for h in heads},
                  "paired_seeds": seeds, "paired_diff": diffs,
                  "diff_light_minus_dgl": mean_ci95(diffs)}
    return out


def _key(r: dict) -> tuple:
    return r["dataset"], r["head"], r["seed"]


def _previous(path: Path, settings: dict, datasets: dict) -> tuple[list[dict], dict]:
    """Runs and data sets an earlier invocation with the same settings left in `path` (any
    seeds and data sets; a data set it ran with other fields is refused)."""
    if not path.is_file():
        return [], {}
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; move it away or run with --fresh") from None
    clash = [d for d, f in old.get("datasets", {}).items() if d in datasets and datasets[d] != f]
    if old.get("settings") != settings or clash:
        raise UserError(f"{path} holds results of other settings; move it away or run with "
                        "--fresh")
    return old.get("runs", []), old.get("datasets", {})


def run_head_cost(out_dir: Path, datasets: dict[str, dict] | None = None,
                  seeds: list[int] | tuple[int, ...] = (0, 1, 2), base: dict | None = None, *,
                  device: str = "auto", threads: int | None = 1, resume: bool = True,
                  log: Callable[[str], None] | None = None, candidate: str = "dgl-light",
                  reference: str = "dgl") -> dict:
    """Train every (data set, seed, head) and write `out_dir/head_cost.{json,md}` after each.

    Args:
        out_dir: where the results go.
        datasets: {data set: RunConfig fields for it} (default `DATASETS`), run in order.
        seeds: seeds (the two heads of a seed run one after the other, so a stopped
            benchmark leaves complete pairs).
        base: RunConfig fields shared by every run (default `BASE`).
        device, threads: RunConfig.device; torch intra-op threads while training.
        resume: keep the runs `head_cost.json` holds with the same settings (other seeds
            and data sets included) and skip those it already has.
        log: called with one line per finished run.
        candidate: the head compared with `reference` (results `stem_of(candidate,
            reference)`.*).
        reference: the head it is compared with (`dgl`, the paper's).
    Returns:
        The results (with `json_path` and `md_path`).
    Raises:
        UserError: a data set that cannot be loaded, a results file of other settings.
    """
    datasets, base = dict(datasets or DATASETS), dict(base or BASE)
    settings = {"base": base, "device": device, "threads": threads}
    heads = (reference, candidate)
    out_dir = Path(out_dir)
    runs, earlier = (_previous(out_dir / f"{stem_of(candidate, reference, base['model'])}.json",
                               settings, datasets) if resume
                     else ([], {}))
    done = {_key(r) for r in runs}
    res = {"benchmark": "head_cost", "edgetrain_version": __version__,
           "torch_version": torch.__version__, "python": platform.python_version(),
           "settings": settings, "datasets": {**earlier, **datasets}, "heads": {},
           "compared": list(heads),
           "runs": runs, "complete": False}
    for d, fields in res["datasets"].items():
        res["heads"][d] = {h: head_params(run_config(base, fields, d, h, 0, device))
                           for h in heads}
    with torch_threads(threads):
        for d, fields in datasets.items():
            for s in seeds:
                for h in heads:
                    if (d, h, s) in done:
                        continue
                    rec = run_one(run_config(base, fields, d, h, s, device))
                    runs.append({"dataset": d, "head": h, "seed": s, **rec})
                    res = _write(res, out_dir)
                    if log:
                        log(f"{d} {h} seed={s}: best test {rec['best_test_acc']:.4f} (depth "
                            f"{rec['best_depth']}) {rec['run_s']:.0f}s")
    res["complete"] = True
    return _write(res, out_dir)


def _write(res: dict, out_dir: Path) -> dict:
    heads = tuple(res.get("compared", HEADS))
    res = {**res, "summary": summarize(res["runs"], heads),
           "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    stem = stem_of(heads[1], heads[0], res["settings"]["base"]["model"])
    return write_json_and_markdown(res, out_dir, stem, markdown)


def _pct(stat: dict, key: str = "mean") -> str:
    v = stat.get(key)
    return "-" if v is None else f"{100 * v:.2f}"


def markdown(res: dict) -> str:
    """The results page: settings, per data set the heads side by side and the paired
    difference, then every run."""
    st = res["settings"]
    ref, cand = res.get("compared", HEADS)
    name = "light" if cand == "dgl-light" else cand
    what = "the light head" if cand == "dgl-light" else f"the `{cand}` head"
    lines = [f"# Accuracy cost of {what} (`--head {cand}` vs `--head {ref}`)", "",
             f"Sequential TRGL, {json.dumps(st['base'])}; "
             f"{st['threads']} torch thread(s). Best-depth test accuracy (depth chosen on "
             f"validation), in %. Difference: {name} - {ref}, paired by seed. `run s` is wall "
             "time on a shared machine, not a speed figure. "
             + ("" if res["complete"] else "**Incomplete: the runs below finished.**"), "",
             f"| data | settings | head params per module ({ref} / {name}) | {ref} mean ± std | "
             f"{name} mean ± std | {name} - {ref} mean ± std (95% CI) | pairs |",
             "|---|---|---|---|---|---|---|"]
    for d, s in res["summary"].items():
        h, diff = s["heads"], s["diff_light_minus_dgl"]
        params = " / ".join(",".join(str(n) for n in res["heads"][d][k]) for k in (ref, cand))
        ci = "" if diff.get("ci95") is None else f" (± {100 * diff['ci95']:.2f})"
        lines.append(f"| {d} | {json.dumps(res['datasets'][d])} | {params} | "
                     f"{_pct(h[ref])} ± {_pct(h[ref], 'std')} | "
                     f"{_pct(h[cand])} ± {_pct(h[cand], 'std')} | "
                     f"{_pct(diff)} ± {_pct(diff, 'std')}{ci} | {len(s['paired_seeds'])} |")
    lines += ["", "| data | head | seed | best test % | depth | last test % | run s |",
              "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['dataset']} | {r['head']} | {r['seed']} | "
                     f"{100 * r['best_test_acc']:.2f} | {r['best_depth']} | "
                     f"{100 * r['last_test_acc']:.2f} | {r['run_s']:.0f} |")
    return "\n".join(lines) + "\n"
