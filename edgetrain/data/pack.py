"""The packed store every data split streams from: uint8 shards plus a manifest, per split.

A pack is a directory `DATA_CACHE/NAME-KEY/` holding one activation-cache directory per
split (`train/`, and `test/` and `val/` when the source has them), written with
`edgetrain.storage.cache.CacheWriter` in storage dtype uint8: the same shards, checksums and
pread reader as the activation cache, not a second format. Each split's manifest adds its
labels; `pack.json` (written last) adds the class names, the resize policy, the per-channel
mean and std of the training split, the source files with size and mtime, and the counts of
ignored files and skipped bad images.

Rows are in sorted relative-path order (folders) or the loader's order (built-in sets).
The key is a hash of the source (absolute folder path, or built-in name and its options) and
the policy. Atomicity: a pack is built in a temporary sibling directory and renamed into place
when complete, so a pack without `pack.json` is never seen. One writer: a process about to
pack takes the pack's writer lock (`DATA_CACHE/.NAME-KEY.lock`, `edgetrain.storage.lock`)
and waits while another holds it, then looks again, so the ranks of a distributed run (or
two runs started together) decode a folder once; should two writers still race (a cache on
a file system without flock), the first rename wins and the other reads the winner's pack.
A pack whose shards fail their checksums, or whose folder changed (a file added, removed,
resized or touched), is rebuilt. A folder that is gone is read from its pack alone
(`open_gone_folder_pack`, for `edgetrain eval` of a finished run). What opening a pack will
write is known beforehand without writing or decoding (`preview_folder_pack`,
`preview_builtin_pack`: the planner counts it against the data cache's free space).

This file does not split or batch (that is `edgetrain.data.splits` and the readers).
"""
from __future__ import annotations

from dataclasses import dataclass
import errno
import json
import logging
import os
from pathlib import Path
import shutil
import time
from typing import Callable, Iterable, Iterator
import uuid

import numpy as np
import torch
from tqdm import tqdm

from edgetrain.data.folder import (FolderScan, ResizePolicy, decode, folder_digest, probe_policy,
                                   scan_folder)
from edgetrain.errors import UserError
from edgetrain.storage.atomic import atomic_write_json, json_text
from edgetrain.storage.cache import (CacheInvalid, CacheReader, CacheWriter, check_free_space,
                                     digest, planned_bytes, written_bytes)
from edgetrain.storage.lock import FileLock
from edgetrain.units import MIB

PACK_FORMAT = 1
SOURCES_JSON = "sources.json"  # every source file with size and mtime
PACK_JSON = "pack.json"
DEFAULT_DATA_CACHE = Path.home() / ".cache" / "edgetrain" / "data"
SHARD_BYTES = 16 * MIB
DECODE_BATCH = 256
LABEL_DTYPE = torch.int32  # labels held per image (a batch's are int64: `Split.labels`)
log = logging.getLogger("edgetrain")


@dataclass
class PackedSplit:
    """One split of a pack: the row reader (uint8 (N, C, H, W) by pread) and its labels."""

    reader: CacheReader
    labels: torch.Tensor  # (N,) LABEL_DTYPE

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Pack:
    """An opened, verified pack."""

    directory: Path
    info: dict  # pack.json
    splits: dict[str, PackedSplit]

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])


def data_cache_dir(data_cache: str | Path | None) -> Path:
    return Path(data_cache).expanduser() if data_cache else DEFAULT_DATA_CACHE


# --------------------------------------------------------------------------- opening
def open_folder_pack(root: Path, data_cache: str | Path | None = None,
                     size: tuple[int, int] | None = None, channels: int | None = None,
                     skip_bad: bool = False) -> Pack:
    """The pack of image folder `root` under the policy, packed first if absent or stale.

    Whether the pack is stale is decided by `folder_digest` (streamed, nothing kept per
    image); the folder is scanned file by file only to (re)pack it.

    Raises:
        UserError: any bad folder (see `scan_folder`), a corrupt image without `skip_bad`,
            images of different sizes without `size`, the folder changed while packing,
            the disk full.
    """
    sources = folder_digest(root)
    final, key = folder_pack_location(root, data_cache, size, channels, skip_bad)
    return _open_or_pack(final, key, sources, lambda tmp: _write_folder(
        tmp, key, scan_folder(root), size, channels, skip_bad))


def folder_pack_location(root: Path, data_cache: str | Path | None,
                         size: tuple[int, int] | None, channels: int | None, skip_bad: bool
                         ) -> tuple[Path, str]:
    """(pack directory, key) of image folder `root` under the policy; nothing is read."""
    root = Path(root).resolve()
    key = digest("folder", PACK_FORMAT, str(root), list(size) if size else None, channels,
                 skip_bad)
    return data_cache_dir(data_cache) / f"{root.name}-{key[:16]}", key


def open_gone_folder_pack(root: Path, data_cache: str | Path | None = None,
                          size: tuple[int, int] | None = None, channels: int | None = None,
                          skip_bad: bool = False) -> Pack:
    """The pack of an image folder that no longer exists, read as it was packed (nothing to
    compare it with: the pack is what the run was trained on).

    Raises:
        UserError: no complete, verified pack of that folder and policy in the data cache
            (the message names the folder and the pack directory looked for).
    """
    final, key = folder_pack_location(root, data_cache, size, channels, skip_bad)
    try:
        return read_pack(final, key)
    except CacheInvalid as e:
        why = "is not there" if not final.exists() else f"is unusable ({e})"
        raise UserError(f"the image folder {Path(root).resolve()} is gone and its pack {why}: "
                        f"looked for {final} (--data-cache {final.parent}); restore the "
                        "folder or its pack (predict and export need only the run "
                        "directory)") from None


def open_builtin_pack(name: str, options: dict, load: Callable[[], object],
                      data_cache: str | Path | None = None) -> Pack:
    """The pack of built-in data set `name` (loaded by `load()` only when it must be packed)."""
    final, key = builtin_pack_location(name, options, data_cache)
    return _open_or_pack(final, key, None, lambda tmp: _write_raw(tmp, key, name, load()))


def builtin_pack_location(name: str, options: dict, data_cache: str | Path | None
                          ) -> tuple[Path, str]:
    """(pack directory, key) of built-in data set `name` with `options`; nothing is read."""
    key = digest("builtin", PACK_FORMAT, name, options)
    return data_cache_dir(data_cache) / f"{name}-{key[:16]}", key


# --------------------------------------------------------------------------- previewing
@dataclass
class PackPreview:
    """A data set's pack as opening it will find or write it, known without writing anything
    or decoding an image (what `edgetrain train --fit` plans with, issue #21)."""

    directory: Path  # where the pack is or will be
    shape: tuple[int, ...]  # one row, (C, H, W)
    class_names: list[str]
    labels: dict[str, torch.Tensor]  # per pack split ("train", and "test", "val" if any)
    write_bytes: int  # what opening it writes: 0 when a complete, current pack is there


def preview_folder_pack(root: Path, data_cache: str | Path | None = None,
                        size: tuple[int, int] | None = None, channels: int | None = None,
                        skip_bad: bool = False) -> PackPreview:
    """What `open_folder_pack` with these arguments will find or write: the folder is
    scanned and, unless `size` and `channels` are both given, its image headers are read as
    packing reads them (`probe_policy`); nothing is decoded. Every image is counted (a
    corrupt one that `skip_bad` skips would not be).

    Raises:
        UserError: as `open_folder_pack` before it decodes (a bad folder, images of
            different sizes without `size`, no image Pillow can open).
    """
    scan = scan_folder(root)
    final, key = folder_pack_location(scan.root, data_cache, size, channels, skip_bad)
    pack = _try_open(final, key, scan.sources_digest(), warn=False)
    if pack is not None:
        return _preview_of(pack)
    every = [f for sp in scan.splits.values() for f in sp.files]
    # without both a size and channels, the headers decide them (any colour image: 3)
    policy = ResizePolicy(size, channels) if size and channels else \
        probe_policy(scan.root, every, size, channels)
    if policy.size is None:
        raise UserError(f"no image in {scan.root} is one Pillow can open")
    labels = {("train" if name == "all" else name): torch.tensor(sp.labels, dtype=torch.int64)
              for name, sp in scan.splits.items()}
    shape = (policy.channels, *policy.size)
    info = _folder_info(key, scan, {k: len(v) for k, v in labels.items()}, policy,
                        _stats_placeholder(policy.channels), [], _SECONDS_PLACEHOLDER)
    sources = len(json_text(scan.sources()))
    return PackPreview(final, shape, scan.class_names, labels,
                       pack_write_bytes(labels, shape, info) + sources)


def preview_builtin_pack(name: str, options: dict, load: Callable[[], object],
                         data_cache: str | Path | None = None) -> PackPreview:
    """What `open_builtin_pack` with these arguments will find or write (a set not yet
    packed is loaded into memory by `load()` to learn its size, and released)."""
    final, key = builtin_pack_location(name, options, data_cache)
    pack = _try_open(final, key, None, warn=False)
    if pack is not None:
        return _preview_of(pack)
    raw = load()
    labels = {"train": raw.train_y}
    if raw.test_x is not None:
        labels["test"] = raw.test_y
    shape = tuple(raw.train_x.shape[1:])
    info = _raw_info(key, name, raw, {k: len(v) for k, v in labels.items()},
                     _stats_placeholder(shape[0]))
    return PackPreview(final, shape, list(raw.class_names), labels,
                       pack_write_bytes(labels, shape, info))


def pack_write_bytes(labels: dict[str, torch.Tensor], shape: tuple[int, ...],
                     info: dict) -> int:
    """Bytes a pack of these splits (`labels`: one entry per row) and this pack.json takes:
    per split, N x C x H x W uint8 rows, the shard headers and the manifest with its labels
    (`edgetrain.storage.cache.written_bytes`); then pack.json. An image folder's
    sources.json is the caller's to add."""
    splits = sum(written_bytes(len(y), shape, "uint8", shard_bytes=SHARD_BYTES,
                               extra={"labels": torch.as_tensor(y).tolist()})
                 for y in labels.values())
    return splits + len(json_text(info))


# pack.json's statistics and timings are known only after packing: placeholders of about
# their length (the mean and std of uint8 / 255 are below 1 and rounded to 6 decimals)
_SECONDS_PLACEHOLDER = 1000.001


def _stats_placeholder(channels: int) -> tuple[list[float], list[float]]:
    return [0.123456] * channels, [0.123456] * channels


def _preview_of(pack: Pack) -> PackPreview:
    return PackPreview(pack.directory, tuple(pack.info["shape"]), pack.class_names,
                       {name: sp.labels for name, sp in pack.splits.items()}, 0)


def _open_or_pack(final: Path, key: str, sources: str | None,
                  write: Callable[[Path], dict]) -> Pack:
    """The pack in `final` if usable; else pack it under its writer lock (waiting for a
    process that is packing it, then reading that process's pack)."""
    pack = _try_open(final, key, sources, warn=False)  # warned below, once, if still unusable
    if pack is not None:
        return pack
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(final.parent / f".{final.name}.lock").acquire(wait=True)
    except OSError as e:
        raise UserError(f"cannot write to the data cache {final.parent}: {e.strerror or e}; "
                        "use --data-cache DIR") from None
    try:
        pack = _try_open(final, key, sources)  # packed by the process we waited for
        return pack if pack is not None else _publish(final, key, write, sources)
    finally:
        lock.release()


def _try_open(final: Path, key: str, sources: str | None, warn: bool = True) -> Pack | None:
    """The pack in `final` when complete, of this key, verified and (folders) not stale:
    `sources` is the folder's `folder_digest` (None: a built-in data set)."""
    if not (final / PACK_JSON).is_file():
        return None
    try:
        pack = read_pack(final, key)
    except CacheInvalid as e:
        if warn:
            log.warning("%s; repacking", e)
        return None
    if sources is not None and pack.info.get("sources_sha256") != sources:
        if warn:
            log.warning("the folder changed since %s was packed; repacking", final)
        return None
    return pack


def read_pack(directory: Path, key: str | None = None) -> Pack:
    """Open a complete pack and verify its shards.

    Raises:
        CacheInvalid: incomplete (no pack.json), another key, corrupt or truncated shards.
    """
    directory = Path(directory)
    try:
        info = json.loads((directory / PACK_JSON).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise CacheInvalid(f"no complete data pack in {directory}") from None
    if info.get("format") != PACK_FORMAT or (key is not None and info.get("key") != key):
        raise CacheInvalid(f"data pack {directory} was made from another source or policy")
    splits = {}
    for name in info["splits"]:
        reader = CacheReader(directory / name, info["key"])
        labels = torch.tensor(reader.manifest.pop("labels"), dtype=LABEL_DTYPE)  # list let go
        if len(labels) != reader.count:
            raise CacheInvalid(f"data pack {directory / name} has {len(labels)} labels for "
                               f"{reader.count} rows")
        splits[name] = PackedSplit(reader, labels)
    return Pack(directory, info, splits)


# --------------------------------------------------------------------------- writing
def _publish(final: Path, key: str, write: Callable[[Path], dict], sources: str | None) -> Pack:
    """Build a pack in a temporary sibling of `final`, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        info = write(tmp)
        atomic_write_json(tmp / PACK_JSON, info)
        if final.exists() and _try_open(final, key, sources) is None:
            remove_pack(final)  # stale, corrupt or half-removed: replaced by the new one
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            log.info("another process packed %s first; using its pack", final)  # ours goes
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left in {final.parent} while packing; nothing was kept: "
                            "free space or use --data-cache DIR") from None
        raise
    except UserError as e:
        if "no space left" in str(e):
            raise UserError(f"no space left in {final.parent} while packing; nothing was kept: "
                            "free space or use --data-cache DIR") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return read_pack(final, key)


def remove_pack(directory: Path) -> None:
    """Delete a pack: pack.json first, so a half-removed pack is never read."""
    directory = Path(directory)
    if (directory / PACK_JSON).exists():
        (directory / PACK_JSON).unlink()
    shutil.rmtree(directory, ignore_errors=True)


class _Stats:
    """Per-channel sum and sum of squares of uint8 rows (float64), for mean and std."""

    def __init__(self):
        self.s = self.ss = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:  # (B, C, H, W) uint8
        xf = x.double() / 255.0
        s, ss = xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3))
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += x.shape[0] * x.shape[2] * x.shape[3]

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.s / self.n
        std = (self.ss / self.n - mean * mean).clamp_min(0).sqrt()
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _write_split(directory: Path, key: str, shape: tuple[int, ...], n: int,
                 batches: Iterable[tuple[torch.Tensor, list[int]]], extra: dict,
                 stats: _Stats | None = None) -> int:
    """Write one split's shards and manifest from (uint8 rows, labels) batches; returns rows."""
    writer = CacheWriter(directory, key, shape, "uint8", n, shard_bytes=SHARD_BYTES)
    labels: list[int] = []
    for x, y in batches:
        writer.add(x)
        labels.extend(int(v) for v in y)
        if stats is not None:
            stats.add(x)
    writer.extra = {**extra, "labels": labels}
    writer.close(n=len(labels))  # skipped images shrink the split
    return len(labels)


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int = 4096) -> Iterator:
    for i in range(0, len(y), size):
        yield x[i:i + size].contiguous(), y[i:i + size].tolist()


def _write_raw(tmp: Path, key: str, name: str, raw) -> dict:
    """Pack a built-in data set's in-memory arrays (loaded once, then released)."""
    parts = {"train": (raw.train_x, raw.train_y)}
    if raw.test_x is not None:
        parts["test"] = (raw.test_x, raw.test_y)
    shape = tuple(raw.train_x.shape[1:])
    check_free_space(tmp.parent, sum(planned_bytes(len(y), shape, "uint8")
                                     for _, y in parts.values()), f"packing {name}")
    stats, counts = _Stats(), {}
    for split, (x, y) in parts.items():
        counts[split] = _write_split(tmp / split, key, shape, len(y), _chunks(x, y), {},
                                     stats if split == "train" else None)
    return _raw_info(key, name, raw, counts, stats.result())


def _raw_info(key: str, name: str, raw, counts: dict[str, int],
              stats: tuple[list[float], list[float]]) -> dict:
    """A built-in data set's pack.json."""
    return {"format": PACK_FORMAT, "key": key, "source": name, "splits": list(counts),
            "counts": counts, "shape": list(raw.train_x.shape[1:]),
            "class_names": list(raw.class_names), "flip": bool(raw.flip), "mean": stats[0],
            "std": stats[1], "policy": None, "ignored_files": 0, "skipped_bad_images": []}


def _write_folder(tmp: Path, key: str, scan: FolderScan, size, channels, skip_bad: bool) -> dict:
    """Decode every image of the folder once into the pack (progress bar with images/s)."""
    every = [f for sp in scan.splits.values() for f in sp.files]
    policy = probe_policy(scan.root, every, size, channels)
    shape = (policy.channels, *policy.size)
    check_free_space(tmp.parent, planned_bytes(len(every), shape, "uint8"),
                     f"packing {scan.root}")
    stats, counts, skipped = _Stats(), {}, []
    t0 = time.perf_counter()
    with tqdm(total=len(every), desc=f"packing {scan.root.name}", unit="img",
              disable=None, leave=False) as bar:
        for name, sp in scan.splits.items():
            split = "train" if name == "all" else name
            batches = _decode_batches(scan.root, sp.files, sp.labels, policy, skip_bad, skipped, bar)
            counts[split] = _write_split(tmp / split, key, shape, len(sp.files), batches, {},
                                         stats if split == "train" else None)
    seconds = time.perf_counter() - t0
    atomic_write_json(tmp / SOURCES_JSON, scan.sources())  # for people; runs read the digest
    sources = scan.sources_digest()
    if folder_digest(scan.root) != sources:
        raise UserError(f"{scan.root} changed while it was being packed; nothing was kept: "
                        "run again when it is complete")
    for split, n in counts.items():
        if n == 0:
            raise UserError(f"no readable image in the {split} split of {scan.root}")
    mean, std = stats.result()
    return _folder_info(key, scan, counts, policy, (mean, std), skipped, seconds)


def _folder_info(key: str, scan: FolderScan, counts: dict[str, int], policy: ResizePolicy,
                 stats: tuple[list[float], list[float]], skipped: list[str],
                 seconds: float) -> dict:
    """An image folder's pack.json."""
    images = sum(len(sp.files) for sp in scan.splits.values())
    return {"format": PACK_FORMAT, "key": key, "source": str(scan.root), "splits": list(counts),
            "counts": counts, "shape": [policy.channels, *policy.size],
            "class_names": scan.class_names, "flip": False, "mean": stats[0], "std": stats[1],
            "policy": policy.to_dict(), "sources_sha256": scan.sources_digest(),
            "sources_file": SOURCES_JSON, "ignored_files": scan.ignored,
            "skipped_bad_images": skipped, "pack_seconds": round(seconds, 3),
            "images_per_s": round(images / max(seconds, 1e-9), 1)}


def _decode_batches(root: Path, files: list[str], labels: list[int], policy: ResizePolicy,
                    skip_bad: bool, skipped: list[str], bar) -> Iterator:
    xs, ys = [], []
    for f, y in zip(files, labels):
        try:
            xs.append(decode(root / f, policy))
            ys.append(y)
        except UserError:
            if not skip_bad:
                raise
            skipped.append(f)
        bar.update(1)
        if len(xs) == DECODE_BATCH:
            yield torch.from_numpy(np.stack(xs)), ys
            xs, ys = [], []
    if xs:
        yield torch.from_numpy(np.stack(xs)), ys


def pack_summary(pack: Pack) -> dict:
    """What a run records of its pack (metrics.json / data.json)."""
    info = pack.info
    return {"pack": str(pack.directory), "counts": info["counts"],
            "ignored_files": info.get("ignored_files", 0),
            "skipped_bad_images": len(info.get("skipped_bad_images", [])),
            "skipped_files": info.get("skipped_bad_images", [])[:20]}

