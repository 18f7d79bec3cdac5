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

    def begin(self, trainers) -> tuple[int, int, list[dict] | None]:
        """Write the initial checkpoint, or restore the last one; returns where to go on:
        (epoch, batches of it already trained, that epoch's running sums or None)."""
        self.store = ModuleStore(self.out, [tr.stage for tr in trainers], self.run.device)
        if self.state is None:
            self.save(trainers, 0)
            return 0, 0, None
        return self._restore(trainers)

    def save(self, trainers, next_epoch: int, position: int = 0,
             partial: list[dict] | None = None) -> None:
        """Checkpoint after `next_epoch` epochs and `position` batches of the next one
        (two-phase: .next files, state.json, rename)."""
        tag = epoch_tag(next_epoch, position)
        for k, tr in enumerate(trainers):
            self.store.save(k, tr, {"epoch": tag}, path=next_path(self.out, k))
        self._write_state(next_epoch, finished=False, position=position, partial=partial)
        for k in range(len(trainers)):
            os.replace(next_path(self.out, k), module_path(self.out, k))

    def finish(self) -> None:
        self._write_state(self.run.cfg.epochs, finished=True)

    def seconds(self) -> float:
        """Training time over every part of a resumed run."""
        return self._base_s + time.perf_counter() - self._t0

    def _write_state(self, epoch: int, finished: bool, position: int = 0,
                     partial: list[dict] | None = None) -> None:
        self._seq += 1
        atomic_write_json(self.out / STATE, {
            "edgetrain_version": __version__, "config_sha256": config_hash(self.run.cfg),
            "seq": self._seq, "cursor": {"lap": 0, "module": 0, "epoch": epoch,
                                         "position": position, "partial": partial},
            "rng": rng_state(), "train_s": self.seconds(), "finished": finished,
            "regime": "resident"})

    def _restore(self, trainers) -> tuple[int, int, list[dict] | None]:
        cur = self.state["cursor"]
        epoch, position = int(cur["epoch"]), int(cur.get("position", 0))
        tag = epoch_tag(epoch, position)
        for k, tr in enumerate(trainers):
            nxt = next_path(self.out, k)
            if nxt.is_file():  # killed around the commit point
                if read_meta(nxt).get("epoch") == tag:
                    os.replace(nxt, module_path(self.out, k))
                else:
                    nxt.unlink()
            if read_meta(module_path(self.out, k)).get("epoch") != tag:
                raise UserError(f"module {k} of {self.out} does not match state.json "
                                f"(epoch {tag}); cannot resume")
            load_module(self.out, k, tr.stage)
            self.store.restore_trainer(k, tr)
        set_rng_state(self.state["rng"])
        return epoch, position, cur.get("partial")


def epoch_tag(epoch: int, position: int) -> str:
    """A checkpoint's name in its module files: `E` at an epoch boundary, `E+P` mid-epoch."""
    return str(epoch) if position == 0 else f"{epoch}+{position}"
