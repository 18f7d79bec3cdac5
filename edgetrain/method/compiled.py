"""`--compile`: torch.compile (inductor) of each module's training forward and loss.

Opt-in: the first steps of every module pay the compilation (seconds to minutes on a small
CPU), which only a long run wins back (benchmarks/results/compile.md). Inductor's CPU
backend generates C++, so a run asking for it without a C++ compiler is refused in one line
before anything is written (`check_compile`). The compiled artefacts go to inductor's
cache under the data cache (`inductor_cache_dir`: DATA_CACHE/inductor, unless
TORCHINDUCTOR_CACHE_DIR is set), so a second run of the same shapes, a resumed run and
every later module of the same shape start warm.

What is compiled is `stage_loss` of one trainer (the stage's forward with its transport
term, its head and the loss), with static shapes: a run's full batches and its last,
shorter batch give two graphs. Backward runs through the compiled graph's autograd; the
optimizer step, the finite-loss check and the statistics stay eager.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
import shutil

from edgetrain.errors import UserError

COMPILERS = ("c++", "g++", "clang++")


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use ($CXX, else c++, g++, clang++ on PATH), or None."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return next((p for p in map(shutil.which, COMPILERS) if p), None)


def inductor_cache_dir(data_cache: str | None) -> Path:
    """Where inductor keeps its compiled kernels: $TORCHINDUCTOR_CACHE_DIR, else
    DATA_CACHE/inductor (`--data-cache`, default ~/.cache/edgetrain/data)."""
    from edgetrain.data.pack import data_cache_dir  # imports torch: deferred (help stays light)
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(env) if env else data_cache_dir(data_cache) / "inductor"


def check_compile(cfg) -> None:
    """Refuse `--compile` where it cannot work, before a run directory exists."""
    if not cfg.compile:  # with --distributed: refused by RunConfig
        return
    if cfg.device != "cuda" and cxx_compiler() is None:
        raise UserError("--compile needs a C++ compiler (inductor generates C++ for the CPU): "
                        "install g++ or clang++, or set CXX; or train without --compile")


def compiled_stage_loss(stage_loss, tr, data_cache: str | None):
    """`stage_loss` bound to trainer `tr`, compiled; its cache under `inductor_cache_dir`."""
    import torch  # deferred: the checks above (the CLI's refusals, tests) need no torch
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir(data_cache)))
    return torch.compile(functools.partial(stage_loss, tr), dynamic=False)
