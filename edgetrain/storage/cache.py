"""Activation cache: sharded writer, checksummed manifest, streaming reader with prefetch.

A cache holds the outputs of a frozen prefix for one data split. Rows are stored view-major
(row = view * n + sample) in safetensors shards of at most `shard_bytes`, each holding one
tensor `x` of shape (rows, *shape) in the storage dtype (float32, float16 or bfloat16 for
activations; uint8 for the packed images of `edgetrain.data.pack`, which adds its own fields
to the manifest through `extra`).
`manifest.json` is written last, atomically: a cache without it is incomplete. It records
shape, storage dtype, counts, per-shard size and sha256, and the cache `key` (a hash of the
producing prefix's weights, the data subset, the seed and the augmentation views).

Reading never loads a whole cache: rows are read with `os.pread` at offsets taken from the
shard headers (file-backed memory maps would count every touched page in the process's RSS,
so peak memory would grow with the cache), batch by batch, by a background thread that
keeps a bounded number of batches ready (`prefetch_bytes`). Checksums are verified when a
cache is opened and again before every epoch; a missing, stale, truncated or altered cache
raises `CacheInvalid` and is never read.

This file knows nothing about modules or schedules (that is `edgetrain.regimes.out_of_core`).
"""
from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
import math
import os
from pathlib import Path
import queue
import shutil
import tempfile
import threading
from typing import Iterable, Iterator

import torch

from edgetrain.data.batches import batch_indices, epoch_generator
from edgetrain.errors import UserError
from edgetrain.measure import usable_cores
from edgetrain.storage import atomic  # atomic.atomic_write: where fault tests inject
from edgetrain.storage.atomic import atomic_write_json, json_text
from edgetrain.storage.codec import (DTYPE_CODES, open_safetensors, safetensors_header,
                                     safetensors_parts)
from edgetrain.units import MIB

MANIFEST = "manifest.json"
FORMAT = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "uint8": torch.uint8}


class CacheInvalid(UserError):
    """A cache that must not be read: missing, incomplete, stale (key) or corrupt."""


class CacheOverflow(UserError):
    """Finite activations that the storage dtype cannot hold (float16 beyond 65,504): stored,
    they would be infinities and the next module's loss NaN."""


def digest(*parts) -> str:
    """sha256 of the JSON of `parts` (the cache key builder)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def planned_bytes(rows: int, shape: tuple[int, ...], dtype: str) -> int:
    """Bytes a cache of `rows` rows of `shape` in `dtype` takes on disk (without headers)."""
    return rows * math.prod(shape) * DTYPES[dtype].itemsize


def free_space_margin(need_bytes: int) -> int:
    """Bytes kept free beyond `need_bytes` by `check_free_space` (headers, manifests and
    checkpoints): 1% plus 8 MiB. A planner that checks ahead keeps the same margin."""
    return need_bytes // 100 + 8 * MIB


def written_bytes(n: int, shape: tuple[int, ...], dtype: str, views: int = 1,
                  shard_bytes: int = 8 * MIB, extra: dict | None = None) -> int:
    """Bytes of the files a `CacheWriter` with these arguments writes: each shard's rows and
    safetensors header, and the manifest as `CacheWriter.close` renders it (the key and the
    shard checksums, not known before writing, as placeholders of their length)."""
    rows, row_bytes = n * views, planned_bytes(1, shape, dtype)
    per = max(1, shard_bytes // row_bytes)
    shards = [{"file": f"shard-{i:05d}.safetensors", "rows": r, "sha256": "0" * 64,
               "bytes": 8 + r * row_bytes + len(safetensors_header(
                   [("x", DTYPE_CODES[DTYPES[dtype]], [r, *shape], r * row_bytes)]))}
              for i, r in enumerate(_shard_rows(rows, per))]
    manifest = cache_manifest("0" * 64, shape, dtype, n, views, per, shards, extra or {})
    return sum(sh["bytes"] for sh in shards) + len(json_text(manifest))


def _shard_rows(rows: int, per: int) -> list[int]:
    return [min(per, rows - i) for i in range(0, rows, per)]


def cache_manifest(key: str, shape, dtype: str, n: int, views: int, rows_per_shard: int,
                   shards: list[dict], extra: dict) -> dict:
    """A cache's manifest.json (what `CacheWriter.close` writes)."""
    return {"format": FORMAT, "key": key, "shape": list(shape), "dtype": dtype, "n": n,
            "views": views, "count": n * views, "rows_per_shard": rows_per_shard,
            "shards": shards, **extra}


def check_free_space(directory: Path, need_bytes: int, what: str) -> None:
    """Raise a `UserError` when `directory`'s file system has less than `need_bytes` free.

    A margin of 1% plus 8 MiB is kept for headers, manifests and checkpoints.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as e:
        raise UserError(f"cannot use cache directory {directory}: {e.strerror or e}") from None
    margin = free_space_margin(need_bytes)
    if need_bytes + margin > free:
        raise UserError(f"{what} needs {(need_bytes + margin) / MIB:.1f} MiB in {directory} but "
                        f"only {free / MIB:.1f} MiB are free: free space or use --cache-dir, "
                        "--cache-dtype float16 or fewer --cache-views, then --resume the run")


def check_cache_dir(directory: Path, flag: str = "--cache-dir") -> None:
    """Refuse a cache directory that is not a writable folder and cannot be created (a
    file, a read-only parent), before anything trains or is written.

    Raises:
        UserError: one line naming the folder and why.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{flag} {directory} is a file, not a folder")
    parent = directory
    while not parent.exists():  # the nearest existing ancestor must let us create the rest
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {directory} cannot be created: {parent} is not a folder")
    try:  # a real probe: permission bits say nothing about read-only mounts or /proc
        os.rmdir(tempfile.mkdtemp(prefix=".edgetrain-probe-", dir=parent))
    except OSError as e:
        raise UserError(f"{flag} {directory} cannot be created in {parent}: "
                        f"{e.strerror or e}") from None


class CacheWriter:
    """Appends rows (any float dtype, cast to the storage dtype) and writes shards. Finite
    rows that float16 storage would turn into infinities raise `CacheOverflow`.

    Args:
        directory: the cache directory (created; an old manifest there is removed first).
        key: the cache key recorded in the manifest.
        shape: the shape of one row (without the batch dim).
        dtype: storage dtype name, one of float32, float16, bfloat16.
        n: samples per view; views: number of views (rows = n * views).
        shard_bytes: the largest shard (rounded to whole rows, at least one row).
        extra: more manifest fields (the data pack's labels, class names, sources).
        durable: fsync every shard and the manifest. The activation caches of a run pass
            False: every reader checks a shard's sha256 before reading it (`CacheReader`)
            and the run rebuilds a cache that fails, so only a power loss could cost
            anything, and then a rebuild (#29: the fsyncs were a third of a cache write).
        verified: a `CacheReader` memo (shard path, sha256) -> file stat to record each
            written shard in: a reader of this process then trusts the checksum the writer
            took of the bytes it wrote, instead of reading the shard back to hash it.
    """

    def __init__(self, directory: Path, key: str, shape: tuple[int, ...], dtype: str, n: int,
                 views: int = 1, shard_bytes: int = 8 * MIB, extra: dict | None = None,
                 durable: bool = True, verified: dict | None = None):
        self.durable, self.verified = durable, verified
        self.extra = dict(extra or {})
        self.dir, self.key, self.shape, self.dtype = Path(directory), key, tuple(shape), dtype
        self.n, self.views = n, views
        self.row_bytes = planned_bytes(1, self.shape, dtype)
        self.rows_per_shard = max(1, shard_bytes // self.row_bytes)
        self.shards: list[dict] = []
        self._buf: list[torch.Tensor] = []
        self._buffered = 0
        self.rows = 0
        remove_cache(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def add(self, x: torch.Tensor) -> None:
        """Append a batch of rows (B, *shape) in sample order."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"row shape {tuple(x.shape[1:])} != cache shape {self.shape}")
        src, x = x, x.detach().to("cpu", DTYPES[self.dtype]).contiguous()
        if self.dtype == "float16" and not bool(torch.isfinite(x).all()):
            peak = float(src.detach().abs().max())
            if math.isfinite(peak):
                raise CacheOverflow(f"activations reach {peak:.3g}, beyond float16's range "
                                    "(65,504); the cache would hold infinities: use "
                                    "--cache-dtype bfloat16 (same size) or float32")
        while len(x):
            take = min(len(x), self.rows_per_shard - self._buffered)
            self._buf.append(x[:take])
            self._buffered += take
            x = x[take:]
            if self._buffered == self.rows_per_shard:
                self._flush()

    def _flush(self) -> None:
        """Write the buffered rows as one shard, streamed from the row buffers (no joined
        copy, no serialised copy: the shard costs its rows once in memory)."""
        if not self._buffered:
            return
        parts = safetensors_parts([("x", DTYPE_CODES[DTYPES[self.dtype]], [self._buffered, *self.shape],
                                    self._buf)])
        h = hashlib.sha256()

        def write(f):
            for part in parts:
                f.write(part)
                h.update(part)

        name = f"shard-{len(self.shards):05d}.safetensors"
        atomic.atomic_write(self.dir / name, write, self.durable)
        self.shards.append({"file": name, "rows": self._buffered, "bytes": sum(map(len, parts)),
                            "sha256": h.hexdigest()})
        if self.verified is not None:
            self.verified[(str(self.dir / name), h.hexdigest())] = file_stamp(self.dir / name)
        self.rows += self._buffered
        self._buf, self._buffered = [], 0

    def close(self, n: int | None = None) -> dict:
        """Write the last shard and then the manifest (the cache becomes valid); returns it.

        `n` corrects the samples per view announced at construction (a data pack that
        skipped unreadable images)."""
        self.n = self.n if n is None else n
        self._flush()
        if self.rows != self.n * self.views:
            raise ValueError(f"cache got {self.rows} rows, expected {self.n * self.views}")
        manifest = cache_manifest(self.key, self.shape, self.dtype, self.n, self.views,
                                  self.rows_per_shard, self.shards, self.extra)
        atomic_write_json(self.dir / MANIFEST, manifest, self.durable)
        return manifest


def remove_cache(directory: Path) -> None:
    """Delete a cache directory: the manifest first, so a half-removed cache is invalid."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        (directory / MANIFEST).unlink()
    if directory.exists():
        shutil.rmtree(directory)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def file_stamp(path: Path) -> tuple[int, int, int, int]:
    """What identifies a file's contents without reading them: inode, size, mtime, ctime
    (any write to the file, or its replacement, changes one of them)."""
    st = Path(path).stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_manifest(directory: Path, key: str | None) -> dict:
    """The manifest of a complete cache whose key is `key` (None: any key).

    Raises:
        CacheInvalid: no manifest (incomplete or absent), unreadable, or another key.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CacheInvalid(f"no complete activation cache in {directory}")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CacheInvalid(f"unreadable cache manifest {path}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("dtype") not in DTYPES:
        raise CacheInvalid(f"cache manifest {path} has an unknown format")
    if key is not None and m.get("key") != key:
        raise CacheInvalid(f"activation cache in {directory} was made by other weights, data or "
                           "settings (key mismatch); it is not read")
    return m


class CacheReader:
    """Random-access reads of rows of a verified cache (by `os.pread`, never whole shards).

    Args:
        directory: the cache directory.
        key: the expected key; a cache with another key is refused.
        verified: (shard path, sha256) -> the file stat its checksum was checked at, shared by the
            readers of one run (`verify`), so reopening a cache does not hash it again.
    Raises:
        CacheInvalid: see `read_manifest` and `verify`.
    """

    def __init__(self, directory: Path, key: str | None, verified: dict | None = None):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, key)
        m = self.manifest
        self.shape, self.dtype = tuple(m["shape"]), m["dtype"]
        self.n, self.views, self.count = int(m["n"]), int(m["views"]), int(m["count"])
        self.row_bytes = planned_bytes(1, self.shape, self.dtype)
        self.rows_per_shard = int(m["rows_per_shard"])
        self._verified = {} if verified is None else verified
        self.verify()
        self._fds = [os.open(self.dir / s["file"], os.O_RDONLY) for s in m["shards"]]
        self._data_offsets = [self._data_offset(s) for s in m["shards"]]

    def verify(self) -> None:
        """Check every shard's size and sha256 against the manifest (streamed, 1 MiB reads).
        A shard whose file is the one already hashed (same inode, size, mtime and ctime, in
        `verified`) is not hashed again: re-reading the whole cache at every open and before
        every epoch cost 3-4% of a sequential run (#29); any write to the file, or its
        replacement, changes the stat.

        Raises:
            CacheInvalid: a shard is missing, truncated or altered.
        """
        seen = self._verified
        for s in self.manifest["shards"]:
            path = self.dir / s["file"]
            if not path.is_file() or path.stat().st_size != s["bytes"]:
                raise CacheInvalid(f"cache shard {path} is missing or truncated; it is not read")
            stamp = file_stamp(path)
            if seen.get((str(path), s["sha256"])) == stamp:
                continue
            if _file_sha256(path) != s["sha256"]:
                raise CacheInvalid(f"cache shard {path} fails its checksum (altered or corrupt); "
                                   "it is not read")
            seen[(str(path), s["sha256"])] = stamp
        if sum(s["rows"] for s in self.manifest["shards"]) != self.count:
            raise CacheInvalid(f"cache manifest in {self.dir} does not add up; it is not read")

    def _data_offset(self, shard: dict) -> int:
        try:
            f, header, start = open_safetensors(self.dir / shard["file"], "cache shard")
        except UserError as e:
            raise CacheInvalid(f"{e}; it is not read") from None
        f.close()
        x = header.get("x", {})
        expect = [shard["rows"], *self.shape]
        if x.get("dtype") != DTYPE_CODES[DTYPES[self.dtype]] or x.get("shape") != expect:
            raise CacheInvalid(f"cache shard {shard['file']} does not match its manifest")
        return start + x["data_offsets"][0]

    def close(self) -> None:
        for fd in getattr(self, "_fds", []):
            os.close(fd)
        self._fds = []

    def __del__(self):
        self.close()

    def drop_page_cache(self) -> None:
        """Ask the kernel to drop this cache's shards from the page cache (benchmarks)."""
        for fd in self._fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` (global row numbers) as float32 (len(idx), *shape)."""
        return self.raw_rows(idx).float()

    def raw_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` (global row numbers) in the storage dtype (len(idx), *shape)."""
        idx = idx.tolist()
        buf = bytearray(len(idx) * self.row_bytes)
        view = memoryview(buf)
        i = 0
        while i < len(idx):  # coalesce runs of consecutive rows in one shard into one read
            shard, r0 = divmod(idx[i], self.rows_per_shard)
            j = i + 1
            while (j < len(idx) and idx[j] == idx[j - 1] + 1
                   and idx[j] // self.rows_per_shard == shard):
                j += 1
            off = self._data_offsets[shard] + r0 * self.row_bytes
            nbytes = (j - i) * self.row_bytes
            got = os.preadv(self._fds[shard], [view[i * self.row_bytes:i * self.row_bytes + nbytes]], off)
            if got != nbytes:
                raise CacheInvalid(f"cache shard {shard} in {self.dir} is truncated")
            i = j
        x = torch.frombuffer(buf, dtype=DTYPES[self.dtype]) if buf else torch.empty(0, dtype=DTYPES[self.dtype])
        return x.view(len(idx), *self.shape)


def background_reads() -> bool:
    """Whether a reader thread may run beside the training step: only when torch's intra-op
    threads leave a core free (`OMP_NUM_THREADS` below the usable cores; under torchrun, the
    threads of the node's `LOCAL_WORLD_SIZE` processes together).

    With every core in the step's OpenMP team, the reader thread preempts a team member and
    the whole team waits for it at the next barrier. Measured on 2 cores, 2 threads, resnet20
    sequential and multi-lap from page-cached shards (medians of 4-5 paired rounds):
    `train()` took 1.05-1.07x as long with the thread as with the reads done in the step's
    own thread (#29, docs/speed.md)."""
    try:
        procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:  # not torchrun's
        procs = 1
    return torch.get_num_threads() * procs < usable_cores()


def prefetch(items: Iterable, max_items: int, background: bool | None = None) -> Iterator:
    """Iterate `items`, produced by a background thread at most `max_items` ahead when
    `background` (None: `background_reads()`), else in the caller's thread as it asks.

    Exceptions in the producer are re-raised in the consumer; closing the consumer stops
    the producer.
    """
    if not (background_reads() if background is None else background):
        return iter(items)
    return _threaded(items, max_items)


def _threaded(items: Iterable, max_items: int) -> Iterator:
    """`prefetch` with its background thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, max_items))
    stop = threading.Event()
    done = object()

    def produce():
        # one intra-op thread here: a conversion in this thread would start a second OpenMP
        # team of torch's size beside the training step's, on the one free core this thread
        # has (`background_reads`; the setting is per thread, the consumer keeps its own)
        torch.set_num_threads(1)
        try:
            for it in items:
                while not stop.is_set():
                    try:
                        q.put(("item", it), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("done", done))
        except BaseException as e:  # handed to the consumer
            q.put(("error", e))

    t = threading.Thread(target=produce, daemon=True, name="edgetrain-prefetch")
    t.start()
    try:
        while True:
            kind, it = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise it
            yield it
    finally:
        stop.set()
        while t.is_alive():  # drain, so a producer blocked on a full queue can finish
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


@dataclass
class CacheSource:
    """Shuffled training batches (or ordered eval batches) from a cache: a `BatchSource`.

    Epoch e reads view e % views in the order of `RawSource` for the same (seed, salt, e),
    so the cached path sees the same batches as the recompute path.
    """

    reader: CacheReader
    labels: torch.Tensor  # (n,) any integer dtype; batches get int64
    batch_size: int
    device: torch.device
    train: bool = True
    seed: int = 0
    prefetch_bytes: int = 64 * MIB
    # the layout of (B, C, H, W) batches: the modules' (channels-last on AVX-512 CPUs), made
    # in the prefetch thread with the float32 conversion: an NCHW batch into channels-last
    # weights made a module's step 1.1-1.5x as long (#29)
    memory_format: torch.memory_format = torch.preserve_format

    def steps_per_epoch(self) -> int:
        return math.ceil(self.reader.n / self.batch_size)

    def _max_batches(self) -> int:
        return max_batches(self.reader, self.batch_size, self.prefetch_bytes)

    def epoch(self, epoch: int = 0, salt: int = 0):
        self.reader.verify()
        gen = epoch_generator(self.seed, salt, epoch)
        offset = (epoch % self.reader.views) * self.reader.n
        order = list(batch_indices(self.reader.n, self.batch_size, self.train, gen))
        batches = ((float_rows(self.reader, idx + offset, self.memory_format), idx)
                   for idx in order)
        for x, idx in prefetch(batches, self._max_batches()):
            yield x.to(self.device), self.labels[idx].to(self.device, torch.int64)




def float_rows(reader: CacheReader, idx: torch.Tensor,
               fmt: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """`reader.rows(idx)` as float32, (B, C, H, W) rows in memory format `fmt` (one pass)."""
    x = reader.raw_rows(idx)
    if x.dim() == 4:
        return x.to(torch.float32, memory_format=fmt)
    return x.float()


def sequential_rows(reader: CacheReader, batch_size: int, prefetch_bytes: int,
                    fmt: torch.memory_format = torch.preserve_format) -> Iterator[torch.Tensor]:
    """All rows of a cache in order (view-major), batch by batch, through the prefetcher;
    (B, C, H, W) batches in memory format `fmt` (`CacheSource.memory_format`)."""
    starts = range(0, reader.count, batch_size)
    gen = (float_rows(reader, torch.arange(s, min(s + batch_size, reader.count)), fmt)
           for s in starts)
    return prefetch(gen, max_batches(reader, batch_size, prefetch_bytes))


def max_batches(reader: CacheReader, batch_size: int, prefetch_bytes: int) -> int:
    """How many float32 batches (plus their storage-dtype read buffer) fit `prefetch_bytes`."""
    per_batch = batch_size * (math.prod(reader.shape) * 4 + reader.row_bytes)
    return max(1, prefetch_bytes // per_batch)
