"""Module store: one safetensors file per module (weights and head), atomic file writes.

`ModuleStore` owns the module files of an out-of-core (sequential / multilap) run: while
training, module k's file also holds its optimizer state (`optim.*` tensors), its tau state,
step and history (JSON in the safetensors metadata). Loading module k through the store
unloads every other module (their tensors go to the `meta` device), and the store counts
how many modules are resident at once (`max_resident`).

Only safetensors and JSON are ever read from a run directory; nothing is unpickled. This
file does not decide when to checkpoint (that is `edgetrain.sequential`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from safetensors import SafetensorError

from edgetrain import __version__
from edgetrain.errors import UserError


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; run files are meant to be copied and shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device while writing {path}; the previous "
                            "checkpoint is intact: free some space, then run "
                            "`edgetrain train --resume RUN_DIR`") from None
        raise


def atomic_write_stream(path: Path, write) -> None:
    """Atomically write a file produced by `write(f)` (temp file, fsync, rename)."""
    _atomic_write(path, write)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
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
    (tests/test_store_format.py)."""
    header: dict = {"__metadata__": meta} if meta else {}
    data, offset = [], 0
    for name, dtype, shape, chunks in entries:
        n = sum(c.numel() * c.element_size() for c in chunks)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
        data += [memoryview(c.reshape(-1).view(torch.uint8).numpy()) for c in chunks if c.numel()]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [len(text).to_bytes(8, "little"), text, *data]


def _write_safetensors(f, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    for part in safetensors_parts([(name, _ST_DTYPES[tensors[name].dtype],
                                    list(tensors[name].shape), [tensors[name]])
                                   for name in sorted(tensors)], meta):
        f.write(part)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Atomically save tensors (made contiguous, on CPU) to a safetensors file."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda f: _write_safetensors(
        f, flat, {k: str(v) for k, v in (meta or {}).items()}))


_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


def _open(path: Path):
    """(open file, header, data start) of a safetensors file, its header checked against the
    file's size; UserError when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing module file {path}")
    f = open(path, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < n <= size - 8:
            raise ValueError("bad header length")
        header = json.loads(f.read(n))
        for name, e in header.items():
            if name != "__metadata__" and (e["dtype"] not in _FROM_ST
                                           or not 0 <= e["data_offsets"][0] <= e["data_offsets"][1]
                                           or e["data_offsets"][1] > size - 8 - n):
                raise ValueError(f"bad entry {name!r}")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        f.close()
        raise UserError(f"{path} is not a valid safetensors file ({e})") from None
    return f, header, 8 + n


def _read_into(f, start: int, entry: dict, t: torch.Tensor) -> None:
    """Read one tensor's bytes straight into `t` (CPU, contiguous): no copy, no mapping."""
    a, b = entry["data_offsets"]
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
    f, header, start = _open(path)
    out = {}
    with f:
        for name, e in header.items():
            if name == "__metadata__" or not keep(name):
                continue
            t = torch.empty(e["shape"], dtype=_FROM_ST[e["dtype"]])
            try:
                _read_into(f, start, e, t)
            except ValueError as err:
                raise UserError(f"{path} is not a valid safetensors file ({err})") from None
            out[name] = t
    return out


def load_optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Only the `optim.*` tensors of a module file (the weights are not read)."""
    return read_tensors(path, lambda n: n.startswith("optim."))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path)


def module_path(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / "modules" / f"{k:02d}.safetensors"


def save_module(run_dir: Path, k: int, stage: torch.nn.Module, meta: dict | None = None) -> None:
    save_tensors(module_path(run_dir, k), stage.state_dict(), meta)


def load_module(run_dir: Path, k: int, stage: torch.nn.Module) -> None:
    """Load module k's weights into `stage`. On CPU each tensor is read from the file
    straight into the parameter or buffer it belongs to (no second copy of the module)."""
    targets = stage.state_dict()
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in targets.values()):
        sd = read_tensors(module_path(run_dir, k), lambda n: not n.startswith("optim."))
        try:
            stage.load_state_dict(sd)
        except RuntimeError as e:
            raise UserError(f"module {k} in {run_dir} does not match the configuration: "
                            f"{str(e).splitlines()[0]}") from None
        return
    path = module_path(run_dir, k)
    f, header, start = _open(path)
    with f:
        names = {n for n in header if n != "__metadata__" and not n.startswith("optim.")}
        missing, unexpected = sorted(set(targets) - names), sorted(names - set(targets))
        problem = (f"missing {missing[:3]}" if missing else
                   f"unexpected {unexpected[:3]}" if unexpected else None)
        for name, t in targets.items():
            if problem:
                break
            if _FROM_ST[header[name]["dtype"]] != t.dtype:
                problem = f"{name} is {header[name]['dtype']}, expected {t.dtype}"
                break
            try:
                _read_into(f, start, header[name], t)
            except ValueError as e:
                problem = f"{name}: {e}"
        if problem:
            raise UserError(f"module {k} in {run_dir} does not match the configuration or is "
                            f"corrupt: {problem}")


def read_meta(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only; no tensor is read)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing module file {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e})") from None


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


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into `optim.<param>.<name>` tensors and JSON metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{name}"] = v
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_to_tensors`: a state_dict for `Optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [{n: tuple(v) if isinstance(v, list) and n != "params" else v for n, v in g.items()}
              for g in meta["param_groups"]]  # JSON turned tuples (Adam's betas) into lists
    return {"state": state, "param_groups": groups}


class ModuleStore:
    """The module files of a run and the modules in memory: loading k unloads all others.

    Stages are built once (for a deterministic initialisation) and handed to the store,
    which writes them out and releases them; from then on `load(k)` materialises module k
    from its file and sends every other module to the `meta` device (no storage).
    `max_resident` is the largest number of modules ever resident at once after `adopt`.
    """

    def __init__(self, run_dir: Path, stages: list[torch.nn.Module], device: torch.device):
        self.run_dir, self.stages, self.device = Path(run_dir), stages, device
        self.resident: set[int] = set(range(len(stages)))
        self.max_resident = 0

    def path(self, k: int) -> Path:
        return module_path(self.run_dir, k)

    def adopt(self, write: bool) -> None:
        """Take ownership: write every module's initial file (if `write`), release all."""
        for k in range(len(self.stages)):
            if write:
                self.save(k, meta={"progress": json.dumps({"lap": -1, "epochs": 0})})
            self.release(k)

    def release(self, k: int) -> None:
        """Unload module k: its parameters and buffers lose their storage."""
        if k in self.resident:
            for p in self.stages[k].parameters():
                p.grad = None
            self.stages[k].to("meta")
            self.resident.discard(k)

    def load(self, k: int) -> torch.nn.Module:
        """Make module k the only resident module, read from its file; returns the stage."""
        for j in sorted(self.resident - {k}):
            self.release(j)
        if k not in self.resident:
            stage = self.stages[k]
            stage.to_empty(device=self.device)
            load_module(self.run_dir, k, stage)
            self.resident.add(k)
        self.max_resident = max(self.max_resident, len(self.resident))
        return self.stages[k]

    def save(self, k: int, trainer=None, meta: dict | None = None, path: Path | None = None) -> None:
        """Atomically write module k (resident) with, if given, its trainer's state, to its
        file or to `path`."""
        tensors = dict(self.stages[k].state_dict())
        meta = {"edgetrain_version": __version__, "index": str(k),
                **(meta or {})}
        if trainer is not None:
            opt_tensors, opt_meta = optimizer_to_tensors(trainer.opt)
            tensors.update(opt_tensors)
            meta["optimizer"] = json.dumps(opt_meta)
            meta["trainer"] = json.dumps({"step": trainer.step, "history": trainer.history,
                                          "weighting": trainer.weighting.state_dict()})
        save_tensors(path or self.path(k), tensors, meta)

    def meta(self, k: int) -> dict[str, str]:
        return read_meta(self.path(k))

    def restore_trainer(self, k: int, trainer) -> None:
        """Load optimizer, tau state, step and history saved with module k (if any)."""
        meta = self.meta(k)
        if "trainer" not in meta:
            return
        t = json.loads(meta["trainer"])
        trainer.step, trainer.history = int(t["step"]), list(t["history"])
        trainer.weighting.load_state_dict(t["weighting"])
        opt = {n: v.to(self.device) for n, v in load_optimizer_tensors(self.path(k)).items()}
        trainer.opt.load_state_dict(optimizer_from_tensors(opt, json.loads(meta["optimizer"])))

    def weights_digest(self, k: int) -> str:
        """Digest of module k's weights, read tensor by tensor from its file."""
        from safetensors import safe_open
        with safe_open(str(self.path(k)), "pt") as f:
            return tensors_digest(f)

    def strip(self, k: int) -> None:
        """Rewrite module k's file with weights only (the end of training)."""
        meta = self.meta(k)
        if "optimizer" not in meta:
            return
        tensors = {n: v for n, v in load_tensors(self.path(k)).items() if not n.startswith("optim.")}
        keep = {n: v for n, v in meta.items() if n not in ("optimizer",)}
        save_tensors(self.path(k), tensors, keep)


__all__ = ["atomic_write_stream", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "save_tensors", "load_tensors", "module_path", "save_module", "load_module", "save_file", "ModuleStore",
           "read_meta", "tensors_digest", "optimizer_to_tensors", "optimizer_from_tensors"]
