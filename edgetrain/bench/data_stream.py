"""The data pack's benchmark: memory flat in the data set size, streaming speed, packing speed.

Every figure comes from a fresh child process (`python -m edgetrain.bench.data_stream`,
spec as JSON on stdin, one result line on stdout):
- `train`: `schedule.train` on a pack; peak RSS minus the child's RSS after imports. With
  `reader: "ram"` every split's reader is swapped for `InMemoryReader`, which loads the
  whole split into memory first: the former in-memory path, kept only as this baseline.
- `module0`: samples/s of module 0's training for one epoch, streamed from the pack (page
  cache warm, or evicted with `posix_fadvise(DONTNEED)` on every shard) or from RAM.
- `pack`: images/s of packing an image folder (decode, resize, write shards).
- `prepack`: pack the data of one or more configurations (not measured).

The memory-flat table (`run_memory_table`, written as `data_stream_memory.json` / `.md`):
image folders of N and factor x N images, written by the benchmark from Fashion-MNIST
(Debian's files) when present, else from scikit-learn's digits (repeated), packed at the
setup's image size and channels (3x64x64 by default); then peak RSS above imports of e2e
and sequential (activation cache on disk) training streamed from the pack, and of the same
two with the data set in RAM (`InMemoryReader` on the same pack: the built-in sets stream
from their packs too since issue #15, so swapping the reader is how the former in-RAM path
is reproduced, with exactly the same images). Streamed rows should stay flat from N to
factor x N; in-RAM rows grow by the data set's bytes.

The load average (`os.getloadavg`) is recorded beside every figure. This module does not
parse argv: `benchmarks/data_stream.py` does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import time

from edgetrain.bench.results import write_json_and_markdown
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
    import torch  # child process only

    from edgetrain import measure  # imports torch: measured before it
    from edgetrain.regimes import schedule  # imports torch: measured before it
    torch.set_num_threads(int(spec.get("threads", 2)))
    measure.apply_malloc_policy(spec.get("malloc", "system"))  # EDGETRAIN_MALLOC's values
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
    # the run resets VmHWM at every phase boundary (PhaseRecorder): the process peak is the
    # run's own `peak_rss_mib` (the max across those resets, loading included), not VmHWM now
    peak = max(measure.peak_rss_bytes(), int(m["peak_rss_mib"] * MIB))
    return {"peak_rss_mib": peak / MIB, "import_rss_mib": base / MIB,
            "train_peak_above_imports_mib": (peak - base) / MIB,
            "phases_mib": {k: round(v["peak_rss_mib"] - base / MIB, 2)
                           for k, v in m.get("memory", {}).items()},
            "wall_s": time.perf_counter() - t0, "best_test_acc": m["best_test_acc"]}


def _child_module0(spec: dict) -> dict:
    import torch  # child process only

    from edgetrain.method.loop import make_trainer, train_epochs  # imports torch
    from edgetrain.regimes.run import build_run  # imports torch
    torch.set_num_threads(int(spec.get("threads", 2)))
    cfg = RunConfig.from_dict(spec["cfg"])
    run = build_run(cfg)
    if spec["reader"] == "ram":
        _to_ram(run.data)
    src = run.raw("train", train=True)
    tr = make_trainer(run.stages[0], cfg, 0, run.n_modules, src.steps_per_epoch())
    train_epochs([tr], src, 1, cfg, first_epoch=0)  # warm-up epoch (allocator, page cache when warm)
    if spec["reader"] == "evicted":
        _evict(run.data)
    t0 = time.perf_counter()
    train_epochs([tr], src, 1, cfg, first_epoch=1)
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
    t0 = time.perf_counter()
    for cfg in spec.get("cfgs", [spec.get("cfg")]):
        load_data(RunConfig.from_dict(cfg))
    return {"seconds": time.perf_counter() - t0}


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


# --------------------------------------------------------------------------- memory-flat table
MEMORY_ARMS = (("e2e", "pack"), ("sequential", "pack"), ("e2e", "ram"), ("sequential", "ram"))
READER_WORDS = {"pack": "streamed from the pack", "ram": "in RAM (InMemoryReader)"}


@dataclass
class MemorySetup:
    """The memory-flat table's configuration: folders of `n` and `factor * n` images."""

    n: int = 5000
    factor: int = 8
    image_size: tuple[int, int] = (64, 64)
    channels: int = 3
    model: str = "kmresnet"
    width: int = 2
    depth: int = 2
    modules: int = 2
    batch_size: int = 128
    epochs: int = 1
    prefetch_mib: float = 16.0
    threads: int = 2
    malloc: str = "system"  # the allocator policy of the children: system = the CLI without a budget

    def sizes(self) -> list[int]:
        return [self.n, self.n * self.factor]

    def cfg(self, folder: Path, mode: str, data_cache: Path) -> dict:
        """The RunConfig fields of one measurement (as a dict for the child's spec)."""
        return dict(data=str(folder), data_cache=str(data_cache),
                    image_size=list(self.image_size), channels=self.channels, model=self.model,
                    width=self.width, depth=self.depth, modules=self.modules, mode=mode,
                    epochs=self.epochs, batch_size=self.batch_size,
                    prefetch_mib=self.prefetch_mib, device="cpu")


def source_images() -> tuple[object, object, list[str], str]:
    """(uint8 images (N, H, W), int labels (N,), class names, source name): Fashion-MNIST's
    training split when Debian's files are present, else scikit-learn's digits."""
    from edgetrain.data import DATASETS  # registry of the built-in sets (imports torch)
    from edgetrain.data.builtin import fashion_available  # imports torch
    name = "fashion-mnist" if fashion_available() else "digits"
    raw = DATASETS.lookup(name)()
    return raw.train_x[:, 0].numpy(), raw.train_y.numpy(), list(raw.class_names), name


def write_image_folder(root: Path, n: int, images=None) -> str:
    """`n` grayscale PNGs in ImageFolder layout (one sub-folder per class) from `images`
    (default `source_images()`), class-balanced: image i is of class i mod C (the classes'
    images cycled when a class has too few); returns the source's name."""
    import numpy as np  # the class index lists only

    from PIL import Image  # image files only here
    x, y, names, source = images if images is not None else source_images()
    by_class = [np.flatnonzero(np.asarray(y) == c) for c in range(len(names))]
    by_class = [idx for idx in by_class if len(idx)]
    for i in range(n):
        idx = by_class[i % len(by_class)]
        j = int(idx[(i // len(by_class)) % len(idx)])
        d = Path(root) / names[int(y[j])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[j]).save(d / f"{i:06d}.png")
    return source


def memory_markdown(res: dict) -> str:
    """The memory-flat table: one row per (mode, reader, images), then the factor x N / N
    ratio of each (mode, reader)."""
    s = res["setup"]
    c, (h, w) = s["channels"], s["image_size"]
    lines = [
        "# Peak RSS vs data set size: streamed from an image folder's pack vs in RAM", "",
        f"Image folders of {s['n']} and {s['n'] * s['factor']} PNGs written from "
        f"{res.get('source', '?')}, packed at {c}x{h}x{w}; {s['model']} width {s['width']} "
        f"depth {s['depth']}, K={s['modules']}, batch {s['batch_size']}, {s['epochs']} "
        f"epoch(s), {s['threads']} threads. Peak RSS of the whole `schedule.train` (pack "
        "already built) minus the fresh child's RSS after imports. `in RAM`: every split's "
        "reader replaced by `InMemoryReader` (the former in-memory path) on the same pack. "
        f"Allocator policy of the children: `{s.get('malloc', 'system')}` (EDGETRAIN_MALLOC's "
        "values: `system` is the CLI without a memory budget, `compact` under one).",
        "", f"Machine: {res.get('machine', '?')}; `uptime` at the start: "
        f"`{res.get('uptime_start', '?')}`.", "",
        "| mode | data | images | peak RSS above imports (MiB) | wall s | load avg |",
        "|---|---|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['mode']} | {READER_WORDS[r['reader']]} | {r['n_images']} | "
                     f"{r['train_peak_above_imports_mib']:.1f} | {r['wall_s']:.0f} | "
                     f"{', '.join(str(v) for v in r.get('loadavg_1min', []))} |")
    lines.append("")
    for mode, reader in MEMORY_ARMS:
        ratio = memory_ratio(res["rows"], mode, reader, s["n"], s["n"] * s["factor"])
        what = f"{ratio:.3f}" if ratio is not None else "**not measured at both sizes**"
        lines.append(f"- {mode}, {READER_WORDS[reader]}: {s['n'] * s['factor']} vs {s['n']} "
                     f"images: ratio {what}")
    return "\n".join(lines) + "\n"


def memory_ratio(rows: list[dict], mode: str, reader: str, small: int, large: int
                 ) -> float | None:
    """Peak RSS above imports at `large` images over the figure at `small` (None if either
    is missing)."""
    got = {r["n_images"]: r["train_peak_above_imports_mib"] for r in rows
           if r["mode"] == mode and r["reader"] == reader}
    if small not in got or large not in got or got[small] <= 0:
        return None
    return got[large] / got[small]


def run_memory_table(setup: MemorySetup, work: Path, out_dir: Path, machine: str = "",
                     echo=print) -> dict:
    """Write the folders, pack them (one child), then measure every (mode, reader, size) in
    a fresh child; `data_stream_memory.json` / `.md` in `out_dir` are rewritten after every
    row (a partial table survives an interruption). Run directories are deleted after each
    measurement (their activation caches grow with the data set)."""
    work, cache = Path(work), Path(work) / "data-cache"
    images = source_images()
    folders = {n: work / f"folder-{n}" for n in setup.sizes()}
    for n, folder in folders.items():
        if not folder.exists():
            write_image_folder(folder, n, images)
    res = {"setup": asdict(setup), "source": images[3], "machine": machine,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "uptime_start": _uptime(),
           "rows": []}
    res["pack"] = run_child({"kind": "prepack", "cfgs": [setup.cfg(f, "e2e", cache)
                                                         for f in folders.values()]})
    for mode, reader in MEMORY_ARMS:
        for n, folder in folders.items():
            out = work / f"run-{mode}-{reader}-{n}"
            row = run_child({"kind": "train", "cfg": setup.cfg(folder, mode, cache),
                             "malloc": setup.malloc,
                             "reader": reader, "out_dir": str(out), "threads": setup.threads})
            shutil.rmtree(out, ignore_errors=True)
            res["rows"].append({"mode": mode, "reader": reader, "n_images": n, **row})
            echo(json.dumps(res["rows"][-1]))
            res = write_json_and_markdown(res, out_dir, "data_stream_memory", memory_markdown)
    res["uptime_end"] = _uptime()
    return write_json_and_markdown(res, out_dir, "data_stream_memory", memory_markdown)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    spec = json.loads(sys.stdin.read())
    print(MARK + json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)


if __name__ == "__main__":
    main()
