"""Benchmark: a run from an image folder against the same run from `--data fashion-mnist`.

For every seed, the built-in Fashion-MNIST splits of that seed (`--train-size`, the fixed
`--test-size` subset, validation carved from train) are written as PNG files (lossless) into
`train/`, `val/` and `test/` folders with one sub-folder per class (named by class index,
so the sorted names give the built-in's class order). The same configuration is then trained
from the built-in data and from the folder (packed on first use into a fresh data cache).
Both arms see the same images in every split; what differs is the path (pack of the folder,
rows in sorted file order, so the seeded batch order differs too). Reported: the best-depth
test accuracy per seed and arm, and the paired difference folder - built-in with its mean and
a t interval over seeds. Accuracy is not affected by machine load.

This file does not parse argv (see `research/folder_accuracy/run.py`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
import platform
import statistics
import tempfile
import time

import numpy as np
from PIL import Image
import torch

from edgetrain import __version__
from edgetrain.bench.results import write_json_and_markdown
from edgetrain.config import RunConfig
from edgetrain.data.splits import load_splits
from edgetrain.regimes.schedule import train

ARM = dict(model="kmresnet", width=16, depth=4, modules=2, mode="sequential", epochs=3,
           batch_size=64, lr=0.05, device="cpu")
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def write_split(root: Path, split, num_classes: int) -> int:
    """Every image of `split` (uint8 rows) as root/<class index>/<i>.png; returns the count."""
    for c in range(num_classes):
        (root / f"{c:02d}").mkdir(parents=True, exist_ok=True)
    x = split.rows(torch.arange(len(split))).numpy()  # (N, C, H, W) uint8
    for i, (img, y) in enumerate(zip(x, split.y.tolist())):
        arr = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
        Image.fromarray(arr).save(root / f"{y:02d}" / f"{i:05d}.png")
    return len(x)


def run_folder_accuracy(out_dir: Path, seeds: list[int], train_size: int = 5000,
                        test_size: int = 2000, threads: int | None = 1,
                        stem: str = "folder_accuracy", arm: dict | None = None) -> dict:
    arm = {**ARM, **(arm or {})}
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    rows = []
    res = {"edgetrain": __version__, "torch": torch.__version__, "machine": platform.machine(),
           "threads": threads, "train_size": train_size, "test_size": test_size, "arm": arm,
           "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "rows": rows}
    try:
        with tempfile.TemporaryDirectory(prefix="edgetrain-folderacc-") as tmp:
            tmp = Path(tmp)
            for seed in seeds:
                d = load_splits("fashion-mnist", train_size=train_size, test_size=test_size,
                                seed=seed)
                folder = tmp / f"fmnist-seed{seed}"
                counts = {sp: write_split(folder / sp, getattr(d, sp), d.num_classes)
                          for sp in ("train", "val", "test")}
                row = {"seed": seed, "counts": counts}
                for name, data_kw in [
                        ("builtin", dict(data="fashion-mnist", train_size=train_size,
                                         test_size=test_size)),
                        ("folder", dict(data=str(folder), data_cache=str(tmp / "cache")))]:
                    t0 = time.perf_counter()
                    m = train(RunConfig(**arm, **data_kw, seed=seed), tmp / f"run-{name}-{seed}")
                    row[name] = {"best_test_acc": m["best_test_acc"],
                                 "best_depth": m["best_depth"],
                                 "test_acc": [x["test_acc"] for x in m["modules"]],
                                 "wall_s": time.perf_counter() - t0}
                row["diff"] = row["folder"]["best_test_acc"] - row["builtin"]["best_test_acc"]
                rows.append(row)
                print(f"seed {seed}: builtin {row['builtin']['best_test_acc']:.4f} folder "
                      f"{row['folder']['best_test_acc']:.4f}", flush=True)
                _summarise(res)
                write_json_and_markdown(res, out_dir, stem, markdown)  # after every seed
    finally:
        torch.set_num_threads(old_threads)
    res["load_after"] = os.getloadavg()
    return write_json_and_markdown(_summarise(res), out_dir, stem, markdown)


def _summarise(res: dict) -> dict:
    diffs = [r["diff"] for r in res["rows"]]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else float("nan")
    half = (T95.get(n - 1, 2.0) * statistics.stdev(diffs) / math.sqrt(n)) if n > 1 else None
    res["paired"] = {"n": n, "mean_diff": mean, "ci95_half": half,
                     "builtin_mean": statistics.fmean(r["builtin"]["best_test_acc"]
                                                      for r in res["rows"]) if n else None,
                     "folder_mean": statistics.fmean(r["folder"]["best_test_acc"]
                                                     for r in res["rows"]) if n else None}
    return res


def markdown(res: dict) -> str:
    a = res["arm"]
    lines = ["# Image folder vs built-in Fashion-MNIST: the same run, paired over seeds\n",
             f"edgetrain {res['edgetrain']}, torch {res['torch']}, {res['threads']} thread(s). "
             f"{a['model']} width {a['width']} depth {a['depth']}, {a['mode']} K={a['modules']}, "
             f"{a['epochs']} epochs, batch {a['batch_size']}, lr {a['lr']}; train "
             f"{res['train_size']} (the seed's stratified subset), validation carved from the "
             f"rest, the fixed {res['test_size']}-image test subset. The folder holds exactly "
             "those images as PNG (train/, val/, test/).\n",
             "| seed | built-in best test acc | folder best test acc | folder - built-in |",
             "|---|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['seed']} | {r['builtin']['best_test_acc']:.4f} | "
                     f"{r['folder']['best_test_acc']:.4f} | {r['diff']:+.4f} |")
    p = res["paired"]
    if p["n"]:
        ci = f" ± {p['ci95_half']:.4f} (95% t interval)" if p["ci95_half"] is not None else ""
        lines.append(f"\nMeans: built-in {p['builtin_mean']:.4f}, folder {p['folder_mean']:.4f}; "
                     f"paired difference {p['mean_diff']:+.4f}{ci} over {p['n']} seeds.")
    return "\n".join(lines) + "\n"
