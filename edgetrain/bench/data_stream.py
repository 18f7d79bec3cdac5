"""The data pack's benchmark: memory flat in the data set size, streaming speed, packing speed.

Every figure comes from a fresh child process (`python -m edgetrain.bench.data_stream`,
spec as JSON on stdin, one result line on stdout):
- `train`: `schedule.train` on a pack; peak RSS minus the child's RSS after imports. With
  `reader: "ram"` every split's reader is swapped for `InMemoryReader`, which loads the
  whole split into memory first: the former in-memory path, kept only as this baseline.
- `module0`: samples/s of module 0's training for one epoch, streamed from the pack (page
  cache warm, or evicted with `posix_fadvise(DONTNEED)` on every shard) or from RAM.
- `pack`: images/s of packing an image folder (decode, resize, write shards).
The load average (`os.getloadavg`) is recorded beside every figure. This module does not
parse argv: `benchmarks/data_stream.py` does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys
import time

from edgetrain.config import RunConfig
from edgetrain.units import MIB

MARK = "EDGETRAIN-DATA-RESULT "


class InMemoryReader:
    """The whole of a pack split in memory (uint8 tensor): the benchmark's in-RAM baseline."""

    def __init__(self, reader):
        import torch  # the child imports torch after measuring its import RSS
        self.shape, self.manifest, self.count = reader.shape, reader.manifest, reader.count
        self.x = reader.raw_rows(torch.arange(reader.count))  # (N, C, H, W) uint8

    def raw_rows(self, idx):
        return self.x[idx]


def _to_ram(data) -> None:
    """Swap every split's reader for an `InMemoryReader` (one per distinct pack split)."""
    made: dict = {}
    for sp in (data.train, data.val, data.test):
        key = id(sp.reader)
        if key not in made:
            made[key] = InMemoryReader(sp.reader)
        sp.reader = made[key]


def _evict(data) -> None:
    """Drop the pack's shards from the page cache (clean pages; no root needed)."""
    for sp in (data.train, data.val, data.test):
        sp.reader.drop_page_cache()


def _child_train(spec: dict) -> dict:
    from edgetrain import measure  # imports torch: measured before it
    from edgetrain.regimes import schedule  # imports torch: measured before it
    base = measure.current_rss_bytes()
    cfg = RunConfig.from_dict(spec["cfg"])
    if spec.get("reader") == "ram":
        real = schedule.load_data

        def load_in_ram(c):
            data = real(c)
            _to_ram(data)
            return data
        schedule.load_data = load_in_ram
    t0 = time.perf_counter()
    m = schedule.train(cfg, Path(spec["out_dir"]))
    return {"peak_rss_mib": measure.peak_rss_bytes() / MIB, "import_rss_mib": base / MIB,
            "train_peak_above_imports_mib": (measure.peak_rss_bytes() - base) / MIB,
            "wall_s": time.perf_counter() - t0, "best_test_acc": m["best_test_acc"]}


def _child_module0(spec: dict) -> dict:
    import torch  # child process only

    from edgetrain.method.loop import fit, make_trainer  # imports torch
    from edgetrain.regimes.run import build_run  # imports torch
    torch.set_num_threads(int(spec.get("threads", 2)))
    cfg = RunConfig.from_dict(spec["cfg"])
    run = build_run(cfg)
    if spec["reader"] == "ram":
        _to_ram(run.data)
    src = run.raw("train", train=True)
    tr = make_trainer(run.stages[0], cfg, 0, run.n_modules, src.steps_per_epoch())
    fit([tr], src, 1, cfg, first_epoch=0)  # warm-up epoch (allocator, page cache when warm)
    if spec["reader"] == "evicted":
        _evict(run.data)
    t0 = time.perf_counter()
    fit([tr], src, 1, cfg, first_epoch=1)
    dt = time.perf_counter() - t0
    return {"samples_per_s": len(run.data.train) / dt, "seconds": dt, "n": len(run.data.train)}


def _child_pack(spec: dict) -> dict:
    from edgetrain.data.pack import open_folder_pack  # imports torch
    t0 = time.perf_counter()
    size = tuple(spec["size"]) if spec.get("size") else None
    pack = open_folder_pack(Path(spec["folder"]), spec["data_cache"], size=size)
    dt = time.perf_counter() - t0
    n = sum(pack.info["counts"].values())
    return {"images": n, "seconds": dt, "images_per_s": n / dt,
            "decode_images_per_s": pack.info["images_per_s"]}


def _child_prepack(spec: dict) -> dict:
    from edgetrain.regimes.run import load_data  # imports torch
    load_data(RunConfig.from_dict(spec["cfg"]))
    return {}


CHILDREN = {"train": _child_train, "module0": _child_module0, "pack": _child_pack,
            "prepack": _child_prepack}


def run_child(spec: dict, timeout_s: float = 3600) -> dict:
    """Run one measurement in a fresh process; returns its result plus the load average."""
    env = dict(os.environ)
    load_before = os.getloadavg()[0]
    p = subprocess.run([sys.executable, "-m", "edgetrain.bench.data_stream"],
                       input=json.dumps(spec), capture_output=True, text=True, env=env,
                       timeout=timeout_s)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"child {spec['kind']} failed: {p.stderr.strip()[-2000:]}")
    res = json.loads(lines[-1][len(MARK):])
    res["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return res


def main() -> None:
    spec = json.loads(sys.stdin.read())
    print(MARK + json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)


if __name__ == "__main__":
    main()
