"""Atomic file writes: a reader sees the previous file or the complete new one, never a part.

Every file edgetrain writes into a run directory, a cache or a data pack goes through
`atomic_write` (temporary file in the same folder, fsync, rename). A full disk becomes a
one-line `UserError` that says the previous checkpoint is intact.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
import tempfile

from edgetrain.errors import UserError


def atomic_write(path: Path, write, durable: bool = True) -> None:
    """Write the file that `write(f)` produces through a temporary file in the same
    directory, fsync, then rename: a reader sees the old file or the whole new one.

    `durable=False` skips the fsync: for files whose every reader checks them against a
    checksum and rebuilds them when they fail it (the activation cache's shards and
    manifest). A killed process loses nothing either way (the page cache holds the
    data); only a power loss can leave such a file short or zeroed, and its check then
    rebuilds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; run files are meant to be copied and shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
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


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temporary files that a process killed inside `atomic_write` left in
    `directory` (`.NAME.*.tmp`); call it only while holding the directory's lock, so that
    no live writer's file is taken. Returns what was removed."""
    gone = []
    for p in sorted(Path(directory).glob(".*.tmp")) if Path(directory).is_dir() else ():
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), durable)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), durable)


def json_text(obj) -> str:
    """The text `atomic_write_json` writes for `obj` (also what a planner counts)."""
    return json.dumps(obj, indent=2, sort_keys=True)


def atomic_write_json(path: Path, obj, durable: bool = True) -> None:
    atomic_write_text(path, json_text(obj), durable)
