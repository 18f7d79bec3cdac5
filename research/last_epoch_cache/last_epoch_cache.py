"""Study: sequential training whose next-module inputs come from the last training epoch.

Sequential (and multi-lap) training writes module k+1's inputs with one more eval-mode
forward of the trained module k over the training set: the cache pass. On the #29 regime
job (resnet20, 2 epochs per module) that pass is about 16% of end-to-end's wall time, and
it is why sequential cannot reach 1.10x end-to-end there (docs/speed.md). The alternative
studied here keeps, during module k's last epoch, the features its training forward already
computes (train-mode BatchNorm, the weights of that step, the epoch's augmented inputs) and
trains module k+1 on them: no cache pass, at the price of training module k+1 on features
that are not the ones module k gives at test time (the situation of parallel and end-to-end
training, where every module learns from its predecessor's training-mode outputs).

Both arms run in this file, in RAM, with edgetrain's own pieces (`build_run`,
`make_trainer`, `stage_loss`, `optimizer_step`, `RawSource`, `batch_indices`), so they differ
only in where module k+1's inputs come from:
  `eval-pass`: module k in eval mode over the clean training set after its training (the
      product's sequential regime with `--cache-views 1`; features rounded through the
      cache's float16 like the product's default cache);
  `last-epoch`: module k's training-mode outputs of its last epoch (float16-rounded too),
      in that epoch's shuffled order with their labels.
Module k+1 then reads its inputs in the product's batch order (`epoch_generator(seed, k,
epoch)`). Evaluation is the product's: every depth on validation and test in eval mode,
best depth chosen on validation. Per data set: best-depth test accuracy per seed, means,
and the paired difference last-epoch - eval-pass with its 95% CI.

Results are rewritten after every run (`last_epoch_cache.{json,md}`); a rerun with the same
settings skips what is done. This file does not parse argv (`run.py` does).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
import platform
import time
from typing import Callable

import torch

from edgetrain import __version__
from edgetrain.bench.results import write_json_and_markdown
from edgetrain.config import RunConfig
from edgetrain.data.batches import batch_indices, epoch_generator
from edgetrain.errors import UserError
from edgetrain.method.loop import (RawSource, add_scores, make_trainer, new_scores,
                                   optimizer_step, scores, stage_loss)
from edgetrain.regimes.run import build_run
from research.accuracy.accuracy import torch_threads
from research.accuracy.accuracy_report import mean_ci95

ARMS = ("eval-pass", "last-epoch")
STEM = "last_epoch_cache"
# the head-cost study's sequential TRGL settings (research/head_cost), one block per module
BASE = dict(model="kmresnet", width=None, depth=4, modules=4, mode="sequential",
            transport=True, lr=0.1, tau=10.0, tau_schedule="midpoint", batch_size=64,
            memory_format="contiguous")
DATASETS = {"digits": dict(epochs=2),
            "fashion-mnist": dict(train_size=5000, epochs=2, val_fraction=0.1,
                                  test_size=2000)}


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Rounded through float16, as the product's default activation cache stores it."""
    return x.detach().to(torch.float16).float()


@torch.no_grad()
def _eval_features(stage, batches) -> tuple[torch.Tensor, dict]:
    """Stage (eval mode) over `batches` of (x, y): its outputs and its head's scores."""
    stage.eval()
    acc, out = new_scores(), []
    for x, y in batches:
        z = stage.features(x)
        add_scores(acc, stage.head(z), y)
        out.append(z)
    return torch.cat(out), scores(acc)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


def train_arm(cfg: RunConfig, arm: str) -> dict:
    """Sequential training of `cfg` with next-module inputs from `arm` (see the module
    docstring); returns per-depth val/test accuracy and the best depth (on validation)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}")
    run = build_run(cfg)
    data, bs, dev = run.data, cfg.batch_size, run.device
    steps = math.ceil(len(data.train) / bs)
    total_steps = steps * cfg.epochs
    raw = RawSource(data, data.train, bs, dev, train=True, augment=cfg.augment, seed=cfg.seed)
    clean = RawSource(data, data.train, bs, dev, train=False, seed=cfg.seed)
    split_xy = {s: (torch.cat([x for x, _ in RawSource(data, getattr(data, s), bs, dev,
                                                       train=False).epoch()]),
                    getattr(data, s).y.to(torch.int64))
                for s in ("val", "test")}
    train_x = train_y = None  # module k's inputs for k > 0 (rows with their labels)
    depths = []
    K = len(run.stages)
    for k, st in enumerate(run.stages):
        tr = make_trainer(st, cfg, k, K, total_steps)
        kept_x, kept_y = [], []
        for e in range(cfg.epochs):
            if k == 0:
                batches = raw.epoch(e, salt=k)
            else:
                gen = epoch_generator(cfg.seed, k, e)
                batches = ((train_x[idx], train_y[idx])
                           for idx in batch_indices(len(train_x), bs, True, gen))
            keep = arm == "last-epoch" and e == cfg.epochs - 1 and k + 1 < K
            for x, y in batches:
                tr.stage.train()
                tr.set_lr()
                y = y.long()
                total, _, _, _, z = stage_loss(tr, x, y, cfg.label_smoothing,
                                               cfg.transport_scaling)
                optimizer_step(tr, total)
                tr.weighting.after_step()
                tr.step += 1
                if keep:
                    kept_x.append(_f16(z))
                    kept_y.append(y)
        ev = {}
        for s, (x, y) in split_xy.items():  # the next module reads them float16-rounded
            z, ev[s] = _eval_features(st, _batches(x, y, bs))
            split_xy[s] = (_f16(z), y)
        depths.append({"val_acc": ev["val"]["acc"], "test_acc": ev["test"]["acc"]})
        if k + 1 < K:
            if arm == "last-epoch":
                train_x, train_y = torch.cat(kept_x), torch.cat(kept_y)
            else:
                src = (clean.epoch() if k == 0 else _batches(train_x, train_y, bs))
                with torch.no_grad():
                    st.eval()
                    pairs = [(_f16(st.features(x)), y.long()) for x, y in src]
                train_x = torch.cat([p[0] for p in pairs])
                train_y = torch.cat([p[1] for p in pairs])
    best = max(range(K), key=lambda i: (depths[i]["val_acc"], -i))  # first best on val
    return {"modules": depths, "best_depth": best + 1,
            "best_val_acc": depths[best]["val_acc"], "best_test_acc": depths[best]["test_acc"],
            "last_test_acc": depths[-1]["test_acc"]}


def summarize(runs: list[dict]) -> dict:
    """Per data set: mean/std per arm and the paired last-epoch - eval-pass difference."""
    out = {}
    for d in dict.fromkeys(r["dataset"] for r in runs):
        acc = {a: {r["seed"]: r["best_test_acc"] for r in runs
                   if r["dataset"] == d and r["arm"] == a} for a in ARMS}
        seeds = sorted(set(acc[ARMS[0]]) & set(acc[ARMS[1]]))
        diffs = [acc[ARMS[1]][s] - acc[ARMS[0]][s] for s in seeds]
        out[d] = {"arms": {a: mean_ci95(list(acc[a].values())) for a in ARMS},
                  "paired_seeds": seeds, "paired_diff": diffs,
                  "diff_last_epoch_minus_eval_pass": mean_ci95(diffs)}
    return out


def run_study(out_dir: Path, datasets: dict[str, dict] | None = None,
              seeds: list[int] | tuple[int, ...] = (0, 1, 2, 3, 4), base: dict | None = None,
              *, threads: int | None = 2, resume: bool = True,
              log: Callable[[str], None] | None = None,
              train: Callable[[RunConfig, str], dict] = train_arm) -> dict:
    """Train every (data set, seed, arm); write `out_dir/last_epoch_cache.{json,md}` after
    each run. `resume` keeps the runs of an earlier invocation with the same settings.

    Raises:
        UserError: a results file of other settings.
    """
    datasets, base = dict(datasets or DATASETS), dict(base or BASE)
    settings = {"base": base, "datasets": datasets, "threads": threads}
    out_dir = Path(out_dir)
    path = out_dir / f"{STEM}.json"
    runs = []
    if resume and path.is_file():
        old = json.loads(path.read_text())
        if old.get("settings") != settings:
            raise UserError(f"{path} holds results of other settings; move it away or run "
                            "with --fresh")
        runs = old.get("runs", [])
    done = {(r["dataset"], r["arm"], r["seed"]) for r in runs}
    res = {"benchmark": STEM, "edgetrain_version": __version__,
           "torch_version": torch.__version__, "python": platform.python_version(),
           "settings": settings, "arms": list(ARMS), "runs": runs, "complete": False}
    with torch_threads(threads):
        for d, fields in datasets.items():
            for seed in seeds:
                for arm in ARMS:
                    if (d, arm, seed) in done:
                        continue
                    cfg = RunConfig(**{**base, **fields, "data": d, "seed": seed,
                                       "device": "cpu"})
                    t0 = time.perf_counter()
                    r = train(cfg, arm)
                    runs.append({"dataset": d, "arm": arm, "seed": seed, **r,
                                 "run_s": round(time.perf_counter() - t0, 1)})
                    res["summary"] = summarize(runs)
                    res = write_json_and_markdown(res, out_dir, STEM, markdown)
                    if log:
                        log(f"{d} seed {seed} {arm}: best test {r['best_test_acc']:.4f} "
                            f"(depth {r['best_depth']})")
    res["complete"] = True
    res["summary"] = summarize(runs)
    return write_json_and_markdown(res, out_dir, STEM, markdown)


def _pct(m: dict) -> str:
    if m["mean"] is None:
        return "-"
    std = f" ± {100 * m['std']:.2f}" if m["std"] is not None else ""
    return f"{100 * m['mean']:.2f}{std}"


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = ["# Next-module inputs from the last training epoch (`last-epoch`) against the "
             "cache pass (`eval-pass`)", "",
             f"Sequential TRGL, {json.dumps(s['base'], sort_keys=True)}; {s['threads']} torch "
             "thread(s); both arms in RAM (research/last_epoch_cache/last_epoch_cache.py). "
             "Best-depth test accuracy (depth chosen on validation), in %. Difference: "
             "last-epoch - eval-pass, paired by seed. `run s` is wall time, not a speed "
             "figure." + ("" if res.get("complete") else " **Incomplete: still running or "
                           "stopped.**"), "",
             "| data | settings | eval-pass mean ± std | last-epoch mean ± std | "
             "last-epoch - eval-pass mean ± std (95% CI) | pairs |",
             "|---|---|---|---|---|---|"]
    for d, v in res.get("summary", {}).items():
        diff = v["diff_last_epoch_minus_eval_pass"]
        ci = f" (± {100 * diff['ci95']:.2f})" if diff.get("ci95") is not None else ""
        lines.append(f"| {d} | {json.dumps(s['datasets'][d], sort_keys=True)} | "
                     f"{_pct(v['arms']['eval-pass'])} | {_pct(v['arms']['last-epoch'])} | "
                     f"{_pct(diff)}{ci} | {diff['n']} |")
    lines += ["", "| data | arm | seed | best test % | depth | last test % | per-depth test % | run s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        per = " ".join(f"{100 * m['test_acc']:.1f}" for m in r["modules"])
        lines.append(f"| {r['dataset']} | {r['arm']} | {r['seed']} | "
                     f"{100 * r['best_test_acc']:.2f} | {r['best_depth']} | "
                     f"{100 * r['last_test_acc']:.2f} | {per} | {r['run_s']:.0f} |")
    return "\n".join(lines) + "\n"
