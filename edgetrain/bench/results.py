"""Writing a benchmark's result: `<stem>.json` (stamped with its provenance) and its Markdown
page `<stem>.md`, atomically.

Every result JSON that edgetrain's benchmarks and the research studies write goes through
`write_result_json`, which adds a `provenance` entry (`provenance()`): what ran (edgetrain
version, the git commit of a checkout, torch, Python, the command line) and where (the CPU
model and the flags that decide its kernels, the thread count), and when.
"""
from __future__ import annotations

from datetime import datetime, timezone
import os
from pathlib import Path
import platform
import subprocess
import sys
from typing import Callable

from edgetrain import __version__
from edgetrain.storage.atomic import atomic_write_json, atomic_write_text

# the CPU flags that decide which kernels torch runs (x86_64, then aarch64's `Features`)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile",
             "asimd", "bf16", "i8mm", "sve", "sve2")


def cpu_identity(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and which of `CPU_FLAGS` it has, from /proc/cpuinfo's text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or \
        platform.processor() or "unknown"
    return {"cpu_model": model, "machine": platform.machine(),
            "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the checkout edgetrain runs from (`+dirty` with uncommitted changes);
    None for an installed package."""
    where = Path(where or Path(__file__).resolve().parents[2])
    if not (where / ".git").exists():
        return None
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(where), *a], capture_output=True,  # noqa: E731
                                        text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """What produced a result, on what, and when (the `provenance` entry of a result JSON)."""
    import torch  # deferred: the CLI's help stays torch-free
    return {"edgetrain_version": __version__, "git_commit": git_commit(),
            "torch_version": torch.__version__, "python": platform.python_version(),
            **cpu_identity(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_result_json(path: Path, result: dict) -> dict:
    """Write `result` to `path` with a fresh `provenance` entry; returns what was written."""
    result = {**result, "provenance": provenance()}
    atomic_write_json(Path(path), result)
    return result


def write_json_and_markdown(result: dict, out_dir: Path, stem: str,
                            markdown: Callable[[dict], str]) -> dict:
    """Write `result` as `out_dir/stem.json` and `markdown(result)` as `out_dir/stem.md`;
    returns `result` with `json_path`, `md_path` and its `provenance`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "json_path": str(out_dir / f"{stem}.json"),
              "md_path": str(out_dir / f"{stem}.md")}
    result = write_result_json(Path(result["json_path"]), result)
    atomic_write_text(Path(result["md_path"]), markdown(result))
    return result
