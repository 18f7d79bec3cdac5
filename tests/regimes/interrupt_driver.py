"""Subprocess driver of the interrupt tests: runs `edgetrain train ARGS...` through the CLI
(whose signal handlers are the ones under test) and, before the Nth training step, prints
`ready` and blocks on stdin until the test process has sent its signal and writes a line.
The library is patched here, in the child; it never reads the environment.

usage: python -m tests.regimes.interrupt_driver N ARGS...
"""
import sys

from edgetrain.cli import main
from edgetrain.method import loop


def install_pause(n: int) -> None:
    orig, seen = loop.train_step, [0]

    def hooked(*a, **kw):
        seen[0] += 1
        if seen[0] == n:
            print("ready", flush=True)
            sys.stdin.readline()  # the signal arrives while this blocks
        return orig(*a, **kw)

    loop.train_step = hooked


if __name__ == "__main__":
    install_pause(int(sys.argv[1]))
    main(sys.argv[2:])
