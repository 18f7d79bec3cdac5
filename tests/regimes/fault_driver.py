"""Subprocess driver of tests/regimes/test_faults.py: trains (or resumes) a tiny run and SIGKILLs
itself at the Nth atomic write whose path contains PATTERN (phase: before the write, in the
middle of the temporary file, or after the rename). The library is patched here, in the
test process; it never reads the environment.

usage: python -m tests.regimes.fault_driver RUN_DIR MODE PATTERN N PHASE
"""
import os
import signal
import sys

from edgetrain.regimes.schedule import resume, train
from edgetrain.storage import atomic as store
from tests.conftest import tiny_cfg


def fault_cfg(mode: str):
    if mode == "sequential":
        return tiny_cfg(mode="sequential", epochs=2, modules=3, depth=3, train_size=200)
    return tiny_cfg(mode="multilap", epochs=2, laps=2, modules=2, train_size=200, cache_views=2)


def install_kill(pattern: str, n: int, phase: str) -> None:
    orig, seen = store.atomic_write, [0]

    def hooked(path, write, *args):  # args: atomic_write's `durable`
        if pattern in str(path):
            seen[0] += 1
            if seen[0] == n:
                if phase == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                if phase == "mid":
                    return orig(path, lambda f: (f.write(b"\0" * 64), f.flush(),
                                                 os.kill(os.getpid(), signal.SIGKILL)), *args)
                orig(path, write, *args)
                os.kill(os.getpid(), signal.SIGKILL)
        return orig(path, write, *args)

    store.atomic_write = hooked


def main(run_dir: str, mode: str, pattern: str, n: str, phase: str) -> None:
    install_kill(pattern, int(n), phase)
    if os.path.exists(os.path.join(run_dir, "config.json")):
        resume(run_dir)
    else:
        train(fault_cfg(mode), run_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
