"""Clean stops on SIGINT and SIGTERM: a flag that training checks at step boundaries.

The first signal sets the flag (the running regime then writes a mid-epoch checkpoint and
raises `edgetrain.errors.Stopped`); a second one exits at once with 128 + its number (every
file edgetrain writes goes through an atomic rename and checkpoints commit in two phases, so
the last checkpoint is intact). The handlers are installed explicitly: a process started in
the background by a shell may inherit SIGINT as ignored. Only the CLI installs them (the
library never touches process-wide state on its own); this file knows nothing about training.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """`with StopSignals() as stop:` installs the handlers; `stop()` is True once a signal
    came; `stop.signum` is its number. The previous handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:  # the second signal: now, without another write
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now; the last "
                             "checkpoint is intact\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping at the next step boundary "
                         "to write a checkpoint (send it again to exit at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal's rule
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
