"""Out of memory as one line: which phase and module failed, what the process held, and the
`edgetrain plan` command that chooses a configuration for that much memory.

An allocation failure (CPU or CUDA) anywhere in a run leaves the last checkpoint as it was
(checkpoints are written through atomic renames), so the message says how to resume. This
file does not train and does not plan; it only words the failure.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
import re
import shlex

import torch

from edgetrain.config import RunConfig, option_args
from edgetrain.errors import UserError
from edgetrain.measure import PhaseRecorder, is_out_of_memory, peak_rss_bytes
from edgetrain.units import MIB

PLAN_FIELDS = ("model", "data", "input_shape", "train_size", "synthetic_size", "width", "depth",
               "epochs", "laps", "batch_size", "optimizer", "head", "prefetch_mib")


class OutOfMemory(UserError):
    """An allocation failure during training, worded for the user (exit code 2)."""


def plan_command(cfg: RunConfig, budget_bytes: int) -> str:
    """`edgetrain plan --memory-budget ...` for `cfg`'s model and data in `budget_bytes`."""
    args = ["edgetrain", "plan", "--memory-budget", f"{max(1, budget_bytes // MIB)}MiB"]
    default = RunConfig()
    for name in PLAN_FIELDS:
        v = getattr(cfg, name)
        if v is None or (name not in ("model", "data", "batch_size") and v == getattr(default, name)):
            continue
        args += option_args(name, v)
    return shlex.join(args)


def where(phases: list[str] | None, cfg: RunConfig) -> str:
    """'in phase cache_write of module 2/4' from the phases that were open (outermost first)."""
    if not phases:
        return "outside the training phases"
    inner = phases[-1]
    m = re.fullmatch(r"module_(\d+)_(\w+)", inner)
    if m:
        return f"in phase {m.group(2)} of module {int(m.group(1)) + 1}/{cfg.modules}"
    named = [re.fullmatch(r"module_(\d+)_\w+", p) for p in phases]
    modules = [int(x.group(1)) + 1 for x in named if x]
    if modules:
        return f"in phase {inner} of module {modules[-1]}/{cfg.modules}"
    scope = {"e2e": "the whole network", "parallel": f"all {cfg.modules} modules"}.get(cfg.mode, "")
    return f"in phase {inner}" + (f" ({scope})" if scope else "")


def held_bytes(device: torch.device | None, recorder: PhaseRecorder | None) -> tuple[int, str]:
    """(bytes, what) the process held at its peak: CUDA reserved, or peak RSS on CPU."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_reserved(device), "CUDA memory reserved"
    peak = int(recorder.peak_rss_mib() * MIB) if recorder is not None else peak_rss_bytes()
    return peak, "peak resident memory"


@contextmanager
def out_of_memory_as_user_error(cfg: RunConfig, recorder: PhaseRecorder | None,
                                run_dir: Path | None, device: torch.device | None = None,
                                context: str = "while loading the data and building the model"):
    """Turn an allocation failure inside the block into `OutOfMemory` (one line, exit 2).

    `recorder` names the phase that was open (else `context` says where); `run_dir`, once
    it holds a checkpoint, is named with `train --resume`.
    """
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - allocation failures come as several types
        if not is_out_of_memory(e):
            raise
        n, what = held_bytes(device, recorder)
        phase = where(recorder.failed_in, cfg) if recorder is not None else context
        resume = (f"; the last checkpoint in {run_dir} is intact (`edgetrain train --resume "
                  f"{run_dir}` continues it where more memory is free)"
                  if run_dir is not None and (Path(run_dir) / "state.json").is_file() else "")
        raise OutOfMemory(f"out of memory {phase} ({cfg.mode}): the process held "
                          f"{n / MIB:.0f} MiB ({what}); a configuration for that much memory: "
                          f"{plan_command(cfg, n)}{resume}") from None
