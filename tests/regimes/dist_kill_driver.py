"""torchrun driver of tests/regimes/test_distributed_resume.py: runs `edgetrain train ARGS...` as one
rank, and the rank named KILL_RANK SIGKILLs itself before its training step N (0: never).
The test reads torchrun's RANK here, in the test's own code; the library never does.

usage: torchrun ... -m tests.regimes.dist_kill_driver KILL_RANK N ARGS...
"""
import os
import signal
import sys

from edgetrain.cli import main
from edgetrain.method import loop


def install_kill(n: int) -> None:
    orig, seen = loop.train_step, [0]

    def hooked(*a, **kw):
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*a, **kw)

    loop.train_step = hooked


if __name__ == "__main__":
    kill_rank, n = int(sys.argv[1]), int(sys.argv[2])
    if n > 0 and int(os.environ["RANK"]) == kill_rank:
        install_kill(n)
    main(sys.argv[3:])
