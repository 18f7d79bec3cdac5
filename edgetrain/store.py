"""Module store: one safetensors file per module (weights and head), atomic file writes.

Only safetensors and JSON are ever read from a run directory; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import SafetensorError

from edgetrain.errors import UserError


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Atomically save tensors (made contiguous, on CPU) to a safetensors file."""
    from safetensors.torch import save
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata={k: str(v) for k, v in (meta or {}).items()}))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing module file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e})") from None


def module_path(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / "modules" / f"{k:02d}.safetensors"


def save_module(run_dir: Path, k: int, stage: torch.nn.Module, meta: dict | None = None) -> None:
    save_tensors(module_path(run_dir, k), stage.state_dict(), meta)


def load_module(run_dir: Path, k: int, stage: torch.nn.Module) -> None:
    sd = load_tensors(module_path(run_dir, k))
    sd = {k_: v for k_, v in sd.items() if not k_.startswith("optim.")}
    try:
        stage.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"module {k} in {run_dir} does not match the configuration: "
                        f"{str(e).splitlines()[0]}") from None


__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "save_tensors",
           "load_tensors", "module_path", "save_module", "load_module", "save_file"]
