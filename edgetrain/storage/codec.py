"""The safetensors format: the one writer and the one header parser edgetrain uses.

Writing: `safetensors_parts` lays out the format (8-byte header size, JSON header, raw data)
as byte strings and tensor memory views, nothing copied; `save_tensors` writes a dict of
tensors atomically. Reading: `open_safetensors` parses and checks the header against the
file's size; `read_tensors` and `read_into` read tensors with `preadv` straight into their
destination; `read_meta` returns the string metadata. `safetensors.torch.load_file` reads
every file written here (tests/storage/test_codec.py). Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from edgetrain.errors import UserError
from edgetrain.storage import atomic  # atomic.atomic_write: where fault tests inject

DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_parts(entries: list[tuple[str, str, list[int], list[torch.Tensor]]],
                      meta: dict[str, str] | None = None) -> list:
    """The safetensors format (8-byte header size, JSON header, raw little-endian data) as
    the byte strings and tensor memory views to write in order, nothing copied.

    `entries`: (name, dtype code such as "F32", shape, chunks), the chunks CPU-contiguous
    tensors whose bytes, concatenated, are the tensor's data (a cache shard is written from
    its buffered batches). `safetensors.torch.save` and `save_file` first copy every tensor
    into Python bytes: a second (for `save`, a third) copy of a module and its optimizer
    state at every checkpoint. Read back with `safetensors.torch.load_file`
    (tests/storage/test_store_format.py)."""
    sizes = [(name, dtype, shape, sum(c.numel() * c.element_size() for c in chunks))
             for name, dtype, shape, chunks in entries]
    data = [memoryview(c.reshape(-1).view(torch.uint8).numpy())
            for *_, chunks in entries for c in chunks if c.numel()]
    text = safetensors_header(sizes, meta)
    return [len(text).to_bytes(8, "little"), text, *data]


def safetensors_header(tensors: list[tuple[str, str, list[int], int]],
                       meta: dict[str, str] | None = None) -> bytes:
    """The JSON header (padded to 8 bytes; the file adds its 8-byte length before it) of a
    safetensors file holding `tensors`, each (name, dtype code, shape, data bytes), in order.
    Also what a planner counts for a file not yet written (`edgetrain.storage.cache`)."""
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    for name, dtype, shape, n in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def write_safetensors(f, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    for part in safetensors_parts([(name, DTYPE_CODES[tensors[name].dtype],
                                    list(tensors[name].shape), [tensors[name]])
                                   for name in sorted(tensors)], meta):
        f.write(part)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Atomically save tensors (made contiguous, on CPU) to a safetensors file."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic.atomic_write(path, lambda f: write_safetensors(
        f, flat, {k: str(v) for k, v in (meta or {}).items()}))


FROM_CODE = {v: k for k, v in DTYPE_CODES.items()}


def open_safetensors(path: Path, what: str = "module file"):
    """(open file, header, data start) of a safetensors file, its header checked against the
    file's size: the one parser of the format's header. UserError when it is missing
    (naming it `what`) or not a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {what} {path}")
    f = open(path, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < n <= size - 8:
            raise ValueError("bad header length")
        header = json.loads(f.read(n))
        for name, e in header.items():
            if name != "__metadata__" and (e["dtype"] not in FROM_CODE
                                           or not 0 <= e["data_offsets"][0] <= e["data_offsets"][1]
                                           or e["data_offsets"][1] > size - 8 - n):
                raise ValueError(f"bad entry {name!r}")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        f.close()
        raise UserError(f"{path} is not a valid safetensors file ({e})") from None
    return f, header, 8 + n


def read_into(f, start: int, entry: dict, t: torch.Tensor) -> None:
    """Read one tensor's bytes straight into `t` (CPU, contiguous): no copy, no mapping."""
    a, b = entry["data_offsets"]
    if not t.is_contiguous():  # reshape(-1) would copy, and the read land in the copy
        raise ValueError("the target tensor is not contiguous")
    if b - a != t.numel() * t.element_size() or list(entry["shape"]) != list(t.shape):
        raise ValueError(f"entry shaped {entry['shape']}, expected {list(t.shape)}")
    if b > a:
        if os.preadv(f.fileno(), [memoryview(t.reshape(-1).view(torch.uint8).numpy())],
                     start + a) != b - a:
            raise ValueError("truncated")


def read_tensors(path: Path, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose names `keep` accepts, each read from the file
    into its own new tensor (safetensors' `load_file` maps the whole file, and its pages
    count in the resident set while it is mapped)."""
    f, header, start = open_safetensors(path)
    out = {}
    with f:
        for name, e in header.items():
            if name == "__metadata__" or not keep(name):
                continue
            t = torch.empty(e["shape"], dtype=FROM_CODE[e["dtype"]])
            try:
                read_into(f, start, e, t)
            except ValueError as err:
                raise UserError(f"{path} is not a valid safetensors file ({err})") from None
            out[name] = t
    return out


def read_meta(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only; no tensor is read)."""
    f, header, _ = open_safetensors(path)
    f.close()
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a valid safetensors file (bad metadata)")
    return {str(k): str(v) for k, v in meta.items()}


def tensors_digest(tensors) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors` (sorted by name).

    Args:
        tensors: a dict name -> tensor, or an object with `keys()` and `get_tensor(name)`
            (a safetensors file opened with `safe_open`, read one tensor at a time).
    """
    get = tensors.get_tensor if hasattr(tensors, "get_tensor") else tensors.__getitem__
    h = hashlib.sha256()
    for name in sorted(n for n in tensors.keys() if not n.startswith("optim.")):
        t = get(name).detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
