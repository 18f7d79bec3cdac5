"""Epoch checkpoints of a distributed (torchrun) parallel run: each rank its own modules, the
two-phase commit of the single-process checkpoints (`edgetrain.regimes.checkpoint`).

At every epoch boundary every rank writes its modules (weights, optimizer, tau state, step,
history) to `modules/NN.safetensors.next`; a barrier; rank 0 writes `state.json` (cursor,
every rank's RNG states, world size, config hash, version) atomically — the commit point; a
barrier; every rank renames its `.next` files over its module files. A rank killed before
the commit leaves the previous checkpoint whole (its `.next` files are discarded on
resume); after it, resume promotes them. The batch order and augmentation are pure
functions of (seed, epoch), so `train --resume` under torchrun (same process count) ends
bit-identical to a run never stopped. A stop request (SIGINT / SIGTERM on any rank) is
agreed on at the next epoch boundary: every rank stops after that checkpoint.

This file does not launch processes or move activations between ranks.
"""
from __future__ import annotations

import os
from pathlib import Path
import time

import torch.distributed as dist

from edgetrain import __version__
from edgetrain.errors import UserError
from edgetrain.regimes.checkpoint import next_path
from edgetrain.regimes.p2p import all_gather_json, comm
from edgetrain.storage.atomic import atomic_write_json
from edgetrain.storage.codec import read_meta
from edgetrain.storage.modules import ModuleStore, load_module, module_path
from edgetrain.storage.rundir import STATE, config_hash, rng_state, set_rng_state


class EpochStop(Exception):
    """Some rank was asked to stop: every rank stops after the checkpoint of `epoch` epochs."""

    def __init__(self, epoch: int):
        super().__init__(f"stopped after epoch {epoch}")
        self.epoch = epoch


class RankCheckpoint:
    """One rank's side of the distributed epoch checkpoints (see the module docstring)."""

    def __init__(self, state, out: Path, trainers, resumed: dict | None, stop=None):
        self.rs, self.out, self.trainers, self.resumed = state, Path(out), trainers, resumed
        self.stop = stop
        stages = [None] * (len(state.bounds) - 1)
        for k, st in zip(state.owned, state.stages):
            stages[k] = st
        self.store = ModuleStore(self.out, stages, state.device)
        self._seq = int((resumed or {}).get("seq", 0))
        self._t0 = time.perf_counter()
        self._base_s = float((resumed or {}).get("train_s", 0.0))

    def begin(self) -> int:
        """Write the initial checkpoint, or restore this rank's modules; the first epoch."""
        if self.resumed is None:
            self.save(0, check_stop=False)
            return 0
        epoch = int(self.resumed["cursor"]["epoch"])
        for k, tr in zip(self.rs.owned, self.trainers):
            self._promote_or_discard(k, epoch)
            if read_meta(module_path(self.out, k)).get("epoch") != str(epoch):
                raise UserError(f"module {k} of {self.out} does not match state.json "
                                f"(epoch {epoch}); cannot resume")
            load_module(self.out, k, tr.stage)
            self.store.restore_trainer(k, tr)
        set_rng_state(self.resumed["rng_ranks"][self.rs.rank])
        return epoch

    def _promote_or_discard(self, k: int, epoch: int) -> None:
        nxt = next_path(self.out, k)
        if nxt.is_file():  # killed around the commit point
            if read_meta(nxt).get("epoch") == str(epoch):
                os.replace(nxt, module_path(self.out, k))
            else:
                nxt.unlink()

    def save(self, next_epoch: int, check_stop: bool = True) -> None:
        """The two-phase commit after `next_epoch` epochs; raises `EpochStop` afterwards when
        any rank was asked to stop."""
        for k, tr in zip(self.rs.owned, self.trainers):
            self.store.save(k, tr, {"epoch": str(next_epoch)}, path=next_path(self.out, k))
        ranks = all_gather_json({"rng": rng_state(), "stop": bool(self.stop and self.stop())},
                                self.rs.device)  # also the barrier: every .next file exists
        if self.rs.rank == 0:
            self.write_state(next_epoch, [r["rng"] for r in ranks], finished=False)
        comm("the checkpoint barrier", dist.barrier)  # committed
        for k in self.rs.owned:
            os.replace(next_path(self.out, k), module_path(self.out, k))
        if check_stop and any(r["stop"] for r in ranks) and next_epoch < self.rs.cfg.epochs:
            raise EpochStop(next_epoch)

    def seconds(self) -> float:
        return self._base_s + time.perf_counter() - self._t0

    def write_state(self, epoch: int, rngs: list | None, finished: bool) -> None:
        """state.json (rank 0 only): the commit point of a checkpoint."""
        self._seq += 1
        atomic_write_json(self.out / STATE, {
            "edgetrain_version": __version__, "config_sha256": config_hash(self.rs.cfg),
            "seq": self._seq, "cursor": {"lap": 0, "module": 0, "epoch": epoch},
            "rng_ranks": rngs, "world_size": self.rs.launch.world_size,
            "train_s": self.seconds(), "finished": finished, "regime": "distributed"})
