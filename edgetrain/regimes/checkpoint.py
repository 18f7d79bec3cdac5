"""Checkpoints of the regimes that keep every module resident: e2e and parallel.

At every epoch boundary each module's weights, optimizer and tau state go to
`modules/NN.safetensors.next`, then `state.json` (cursor, RNG states, config hash, version)
is written atomically — the commit point — and the `.next` files replace the module files.
A kill before the commit leaves the previous checkpoint whole (the `.next` files are
discarded on resume); a kill after it is completed on resume by promoting them. Data order
and augmentation are pure functions of (seed, epoch), so a resumed run ends bit-identical
to one that was never killed. Sequential and multilap checkpoint in `edgetrain.regimes.out_of_core`.
"""
from __future__ import annotations

import os
from pathlib import Path
import time

from edgetrain import __version__
from edgetrain.errors import UserError
from edgetrain.storage.atomic import atomic_write_json
from edgetrain.storage.codec import read_meta
from edgetrain.storage.modules import ModuleStore, load_module, module_path
from edgetrain.storage.rundir import STATE, config_hash, rng_state, set_rng_state


def next_path(run_dir: Path, k: int) -> Path:
    return module_path(run_dir, k).with_name(module_path(run_dir, k).name + ".next")


class ResidentCheckpoint:
    """Epoch checkpoints of a run whose stages are all in memory (see the module docstring)."""

    def __init__(self, run, out: Path, state: dict | None = None):
        self.run, self.out, self.state = run, Path(out), state
        self._t0, self._base_s = time.perf_counter(), float((state or {}).get("train_s", 0.0))
        self._seq = int((state or {}).get("seq", 0))

    def begin(self, trainers) -> int:
        """Write the initial checkpoint, or restore the last one; returns the first epoch."""
        self.store = ModuleStore(self.out, [tr.stage for tr in trainers], self.run.device)
        if self.state is None:
            self.save(trainers, 0)
            return 0
        return self._restore(trainers)

    def save(self, trainers, next_epoch: int) -> None:
        """Checkpoint after `next_epoch` epochs (two-phase: .next files, state.json, rename)."""
        for k, tr in enumerate(trainers):
            self.store.save(k, tr, {"epoch": str(next_epoch)}, path=next_path(self.out, k))
        self._write_state(next_epoch, finished=False)
        for k in range(len(trainers)):
            os.replace(next_path(self.out, k), module_path(self.out, k))

    def finish(self) -> None:
        self._write_state(self.run.cfg.epochs, finished=True)

    def seconds(self) -> float:
        """Training time over every part of a resumed run."""
        return self._base_s + time.perf_counter() - self._t0

    def _write_state(self, epoch: int, finished: bool) -> None:
        self._seq += 1
        atomic_write_json(self.out / STATE, {
            "edgetrain_version": __version__, "config_sha256": config_hash(self.run.cfg),
            "seq": self._seq, "cursor": {"lap": 0, "module": 0, "epoch": epoch},
            "rng": rng_state(), "train_s": self.seconds(), "finished": finished,
            "regime": "resident"})

    def _restore(self, trainers) -> int:
        epoch = int(self.state["cursor"]["epoch"])
        for k, tr in enumerate(trainers):
            nxt = next_path(self.out, k)
            if nxt.is_file():  # killed around the commit point
                if read_meta(nxt).get("epoch") == str(epoch):
                    os.replace(nxt, module_path(self.out, k))
                else:
                    nxt.unlink()
            if read_meta(module_path(self.out, k)).get("epoch") != str(epoch):
                raise UserError(f"module {k} of {self.out} does not match state.json "
                                f"(epoch {epoch}); cannot resume")
            load_module(self.out, k, tr.stage)
            self.store.restore_trainer(k, tr)
        set_rng_state(self.state["rng"])
        return epoch
