"""The data pack's figures: peak RSS flat in the data set size (image folders of N and 8N
images, streamed from the pack vs in RAM, e2e and sequential), module 0's samples/s streamed
vs in-RAM (page cache warm and evicted), images/s packing a folder. Every figure from a fresh
process (`edgetrain.bench.data_stream`); the load average beside it.

    python benchmarks/data_stream.py --n 5000 --out benchmarks/results      # everything
    python benchmarks/data_stream.py --parts memory --n 5000                 # the memory table
    python benchmarks/data_stream.py --quick                                 # < 1 minute smoke run

`memory` writes data_stream_memory.json / .md; `throughput` and `pack` write data_stream.json.
`--quick` measures the memory table only (unless --parts says otherwise) on folders of 40 and
160 images packed at 3x8x8, batch 40, into a temporary directory (unless --out is given): it
checks that the benchmark runs (9 fresh processes, each importing torch); its figures mean
nothing. The work directory (folders, packs)
is printed at the end: delete it when done.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path
import sys
import tempfile
import time

from edgetrain.bench.results import write_result_json

QUICK = dict(n=40, factor=4, image_size=(8, 8), batch_size=40)


def cfg(n: int, mode: str, cache: str, width: int, depth: int, train_size=None) -> dict:
    return dict(data="synthetic", input_shape=[3, 64, 64], synthetic_size=n, model="kmresnet",
                width=width, depth=depth, modules=2, mode=mode, epochs=1, batch_size=128,
                data_cache=cache, prefetch_mib=16, train_size=train_size)


def write_folder(root: Path, n: int, ext: str, side: int) -> None:
    """n smooth random RGB images (side x side) in 4 classes."""
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        small = g.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR).save(d / f"{i:06d}.{ext}")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="N images (default 5000; --quick 40)")
    p.add_argument("--factor", type=int, default=None, help="the large folder holds factor x N")
    p.add_argument("--image-size", default=None, help="HxW of the packed folders (64x64)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--module0-train-size", type=int, default=2000)
    p.add_argument("--pack-images", type=int, default=1000)
    p.add_argument("--parts", nargs="+", default=None, choices=["throughput", "pack", "memory"],
                   help="default: all three (--quick: memory)")
    p.add_argument("--quick", action="store_true", help="a < 1 minute smoke run (see above)")
    p.add_argument("--malloc", default="system", help="the memory children's allocator policy "
                   "(system: the CLI without a budget; compact: under one)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of module 0's ram/warm/evicted")
    p.add_argument("--machine", default=None, help="a description of the machine for the results")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; "
                                               "--quick: a temporary directory)")
    return p.parse_args(argv)


def memory_setup(a: argparse.Namespace):
    from edgetrain.bench.data_stream import MemorySetup
    from edgetrain.config import parse_image_size
    base = QUICK if a.quick else {}
    pick = lambda name, default: getattr(a, name) if getattr(a, name) is not None \
        else base.get(name, default)  # noqa: E731
    return MemorySetup(n=pick("n", 5000), factor=pick("factor", 8),
                       image_size=parse_image_size(a.image_size) or base.get("image_size",
                                                                              (64, 64)),
                       channels=a.channels, width=a.width, depth=a.depth,
                       batch_size=pick("batch_size", 128), threads=a.threads, malloc=a.malloc)


def main(argv=None) -> int:
    a = parse(argv)
    parts = a.parts or (["memory"] if a.quick else ["throughput", "pack", "memory"])
    tmp = Path(tempfile.mkdtemp(prefix="edgetrain-data-bench-"))
    out_dir = Path(a.out) if a.out else (tmp / "results" if a.quick else Path("benchmarks/results"))
    machine = a.machine or (f"{platform.machine()}, {os.cpu_count()} CPUs (load average "
                            "recorded per row)")
    if "memory" in parts:
        from edgetrain.bench.data_stream import run_memory_table
        res = run_memory_table(memory_setup(a), tmp, out_dir, machine)
        print(f"wrote {res['md_path']}")
    if {"throughput", "pack"} & set(parts):
        other_parts(a, parts, tmp, out_dir, machine)
    print(f"work directory (image folders, packs): {tmp}")
    return 0


def other_parts(a, parts, tmp: Path, out_dir: Path, machine: str) -> None:
    """Module 0's samples/s (synthetic 3x64x64) and packing images/s -> data_stream.json."""
    from edgetrain.bench.data_stream import run_child
    cache = str(tmp / "cache")
    n = a.n or 5000
    out = out_dir / "data_stream.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "uptime_start": os.popen("uptime").read().strip(), "args": vars(a), "rows": []}

    def record(row):
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_result_json(out, res)

    if "throughput" in parts:
        run_child({"kind": "prepack", "cfg": cfg(n, "e2e", cache, a.width, a.depth)})
        for reader in ("ram", "warm", "evicted") * a.rounds:
            c = cfg(n, "sequential", cache, 4, 2, a.module0_train_size)
            r = run_child({"kind": "module0", "cfg": c, "reader": reader})
            record({"part": "module0", "reader": reader, **r})
    if "pack" in parts:
        for ext, side in (("png", 64), ("jpg", 256)):
            folder = tmp / f"folder-{ext}"
            write_folder(folder, a.pack_images, ext, side)
            r = run_child({"kind": "pack", "folder": str(folder), "data_cache": cache,
                           "size": [64, 64]})
            record({"part": "pack", "format": ext, "source_side": side, **r})
    res["uptime_end"] = os.popen("uptime").read().strip()
    write_result_json(out, res)
    (out_dir / "data_stream.md").write_text(markdown(res))


def markdown(res: dict) -> str:
    """data_stream.md: module 0's samples/s per round (streamed / in RAM) and packing speed;
    the memory table is data_stream_memory.md."""
    rows = res["rows"]
    a = res["args"]
    lines = ["# Data pack: streaming speed and packing speed\n",
             f"{res['machine']}; started {res['started']} UTC (`{res['uptime_start']}`), "
             f"ended `{res['uptime_end']}`. Every figure from a fresh process "
             "(`benchmarks/data_stream.py`). The memory table (peak RSS flat in the data set "
             "size) is `data_stream_memory.md`.\n"]
    m0 = [r for r in rows if r["part"] == "module0"]
    if m0:
        lines += ["## Module 0 samples/s: streamed from the pack vs the same batches from RAM\n",
                  f"Synthetic 3x64x64 pack of {a.get('n') or 5000} images, module 0 of kmresnet "
                  f"width 4 depth 2 (K=2), {a['module0_train_size']} training images, one warm-up "
                  "epoch then one timed epoch. `ram`: the split loaded into a uint8 tensor first "
                  "(`InMemoryReader`, kept for this baseline only); `warm`: pread from the pack, "
                  "page cache warm; `evicted`: the shards dropped from the page cache "
                  "(`posix_fadvise(DONTNEED)`) before the timed epoch.\n",
                  "| round | ram samples/s | warm samples/s | evicted samples/s | warm / ram | "
                  "evicted / ram |", "|---|---:|---:|---:|---:|---:|"]
        ratios = {"warm": [], "evicted": []}
        for i in range(0, len(m0) - 2, 3):
            ram, warm, ev = (m0[i + j]["samples_per_s"] for j in range(3))
            ratios["warm"].append(warm / ram)
            ratios["evicted"].append(ev / ram)
            lines.append(f"| {i // 3 + 1} | {ram:.0f} | {warm:.0f} | {ev:.0f} | {warm / ram:.3f} "
                         f"| {ev / ram:.3f} |")
        med = {k: statistics.median(v) for k, v in ratios.items()}
        lines.append(f"\nMedian over rounds: warm / ram {med['warm']:.3f}, evicted / ram "
                     f"{med['evicted']:.3f}.\n")
    pk = [r for r in rows if r["part"] == "pack"]
    if pk:
        lines += ["## Packing speed (decode, resize to 64x64, write shards)\n",
                  "| source | images | images/s (whole call) | images/s (decode+write loop) |",
                  "|---|---:|---:|---:|"]
        for r in pk:
            lines.append(f"| {r['format'].upper()} {r['source_side']}x{r['source_side']} | "
                         f"{r['images']} | {r['images_per_s']:.0f} | {r['decode_images_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
