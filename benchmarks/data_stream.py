"""The data pack's figures: peak RSS flat in the data set size (pack vs in-RAM), module 0's
samples/s streamed vs in-RAM (page cache warm and evicted), images/s packing a folder.
Every figure from a fresh process (`edgetrain.bench.data_stream`); the load average beside it.

    python benchmarks/data_stream.py --n 5000 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys
import tempfile
import time


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--factor", type=int, default=8)
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--module0-train-size", type=int, default=2000)
    p.add_argument("--pack-images", type=int, default=1000)
    p.add_argument("--parts", nargs="+", default=["throughput", "pack", "memory"])
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    from edgetrain.bench.data_stream import run_child
    tmp = Path(tempfile.mkdtemp(prefix="edgetrain-data-bench-"))
    cache = str(tmp / "cache")
    out = Path(a.out) / "data_stream.json"
    res = {"machine": "shared 2-core CPU host, other engineers' jobs running (load average "
                      "recorded per row)", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "uptime_start": os.popen("uptime").read().strip(), "args": vars(a), "rows": []}

    def record(row):
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(res, indent=1))

    sizes = [a.n, a.n * a.factor]
    for n in sizes:  # packing the synthetic sets is not measured
        run_child({"kind": "prepack", "cfg": cfg(n, "e2e", cache, a.width, a.depth)})
    if "throughput" in a.parts:
        for reader in ("ram", "warm", "evicted", "ram", "warm", "evicted"):
            c = cfg(a.n, "sequential", cache, 4, 2, a.module0_train_size)
            r = run_child({"kind": "module0", "cfg": c, "reader": reader})
            record({"part": "module0", "reader": reader, **r})
    if "pack" in a.parts:
        for ext, side in (("png", 64), ("jpg", 256)):
            folder = tmp / f"folder-{ext}"
            write_folder(folder, a.pack_images, ext, side)
            r = run_child({"kind": "pack", "folder": str(folder), "data_cache": cache,
                           "size": [64, 64]})
            record({"part": "pack", "format": ext, "source_side": side, **r})
    if "memory" in a.parts:
        for mode, reader in (("e2e", "pack"), ("sequential", "pack"), ("e2e", "ram")):
            for n in sizes:
                r = run_child({"kind": "train", "cfg": cfg(n, mode, cache, a.width, a.depth),
                               "reader": reader, "out_dir": str(tmp / f"run-{mode}-{n}-{reader}")})
                record({"part": "memory", "mode": mode, "reader": reader, "n_images": n, **r})
    res["uptime_end"] = os.popen("uptime").read().strip()
    out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
