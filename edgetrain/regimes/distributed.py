"""Parallel module-wise training across processes on torch.distributed (launched by torchrun).

Rank r of P owns a contiguous group of modules, balanced with `edgetrain.method.split.split_balanced`
by the run's `--split` rule (blocks per module, or activation memory per module). Every rank
opens the data set's pack (for the split sizes; an image folder is decoded once, by whichever
rank takes the pack's writer lock first, while the others wait for it: `edgetrain.data.pack`);
rank 0 reads the batches; rank r > 0 receives
(activations, labels) from rank r-1 by plain point-to-point `send`/`recv`. Every rank
trains its modules with the shared `train_epochs` / `train_step` / `Trainer` of
`edgetrain.method.loop` and sends the detached output of its last module (the same tensor the
single-process parallel regime hands to the next module) to rank r+1. No gradient crosses
a rank, so no backward message exists.

Forward unlocking: with `buffer_size` B > 0 each rank has a send thread and a receive
thread (gloo's isend/irecv do not overlap with compute), each holding at most B
activation batches, so rank r-1 computes batch t+1 while rank r trains on batch t. B = 0
sends and receives synchronously in the training thread.

Stale activations: every batch is consumed exactly once, in order (a FIFO, not a replay
buffer). Rank r-1 never receives anything back, so the activations it produces for batch t
depend only on the batches 0..t, never on timing: a buffer changes when a batch arrives,
not what it holds, and the trained weights equal those of B = 0 and of the
single-process parallel regime.

The run directory is the single-process one: rank 0 writes config.json and, after gathering
every rank's figures, metrics.json; each rank writes its own modules/NN.safetensors (a
shared file system for multi-node runs). Validation and test batches stream through the
ranks like training batches.

Not here: launching processes (torchrun), reading the environment (`cli.py` builds a
`Launch`), `torch.distributed.pipelining` (which computes the loss on the last stage only).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from edgetrain import __version__
from edgetrain.config import RunConfig
from edgetrain.errors import Stopped, UserError, first_line
from edgetrain.measure import peak_rss_mib
from edgetrain.method.loop import RawSource, Trainer, evaluate_chain, make_trainer, train_epochs
from edgetrain.method.precision import check_precision, memory_format
from edgetrain.method.split import block_activation_bytes, split_balanced
from edgetrain.method.stage import Stage
from edgetrain.regimes.dist_checkpoint import EpochStop, RankCheckpoint
from edgetrain.regimes.p2p import (PHASE_TEST, PHASE_VAL, Inbox, Link, Outbox, OutputTap,
                                   StreamSource, all_gather_json, broadcast_json, comm,
                                   forward_stream, received)
from edgetrain.regimes.run import (build_run, data_record, resolve_device, sample_inputs,
                                   write_preprocessing)
from edgetrain.storage.atomic import atomic_write_json
from edgetrain.storage.modules import save_module
from edgetrain.storage.lock import lock_run_dir
from edgetrain.storage.rundir import (check_config, claim_out_dir, metrics_record, module_entry,
                                      read_state)
from edgetrain.storage.runlog import LOG, RunLog, epoch_logger

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch (built from the environment by cli.py)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    timeout_s: float = 300.0


def launch_from_env(env: Mapping[str, str], timeout_s: float = 300.0) -> Launch:
    """Read torchrun's variables from `env` (a mapping the caller passes, e.g. os.environ).

    Raises:
        UserError: a variable is missing or malformed.
    """
    missing = [v for v in LAUNCH_VARS if not env.get(v)]
    if missing:
        raise UserError(f"--distributed needs torchrun's environment ({', '.join(missing)} not set):"
                        " launch with torchrun --nproc_per_node P -m edgetrain.cli train"
                        " --mode parallel --distributed ...")
    try:
        launch = Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                        env["MASTER_ADDR"], int(env["MASTER_PORT"]), timeout_s)
    except ValueError:
        raise UserError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers") from None
    if not 0 <= launch.rank < launch.world_size:
        raise UserError(f"RANK {launch.rank} is outside WORLD_SIZE {launch.world_size}")
    return launch


# ----------------------------------------------------------------------------- placement

def module_costs(how: str, bounds: list[int], net: torch.nn.Module, sample: torch.Tensor) -> list[int]:
    """Weight of each module for placing modules on ranks, by the run's `--split` rule:
    `depth` counts blocks, `memory` measures the activation bytes saved for backward (on a
    copy of `net`: a train-mode forward moves BatchNorm statistics, the real one must not)."""
    if how == "depth":
        per_block = [1] * bounds[-1]
    else:
        per_block = block_activation_bytes(copy.deepcopy(net), sample)
    return [sum(per_block[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def rank_groups(costs: list[int], world_size: int) -> list[list[int]]:
    """Contiguous groups of module indices, one per rank, minimising the heaviest group.

    Raises:
        UserError: more ranks than modules.
    """
    if world_size > len(costs):
        raise UserError(f"{world_size} processes but only {len(costs)} modules: launch at most "
                        f"{len(costs)} processes (torchrun --nproc_per_node) or raise --modules")
    bounds = split_balanced(costs, world_size)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------- one rank

@dataclass
class RankState:
    """What one rank holds: its modules, their trainers, and the links to its neighbours."""

    cfg: RunConfig
    launch: Launch
    device: torch.device
    groups: list[list[int]]
    bounds: list[int]
    owned: list[int]
    stages: list[Stage]
    source: object  # RawSource on rank 0
    data: object
    inbox: Inbox | None = None
    outbox: Outbox | None = None
    tap: OutputTap | None = None
    timings: dict = field(default_factory=dict)
    lock: object | None = None  # RUN_DIR/lock (`edgetrain.storage.lock.FileLock`), rank 0 only

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def last(self) -> bool:
        return self.rank == self.launch.world_size - 1


def choose_device(cfg: RunConfig, launch: Launch) -> tuple[torch.device, str]:
    """(device, backend): NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    dev = resolve_device(cfg.device)
    if dev.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {launch.local_rank} but only "
                            f"{torch.cuda.device_count()} CUDA devices; use --device cpu")
        torch.cuda.set_device(launch.local_rank)
        return torch.device("cuda", launch.local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def plan_rank(cfg: RunConfig, launch: Launch, device: torch.device) -> RankState:
    """Build the whole run on CPU exactly as one process would (same seed, same init), keep
    this rank's modules on `device` and drop the rest."""
    run = build_run(cfg, device=torch.device("cpu"))
    sample = sample_inputs(run.data)
    groups = rank_groups(module_costs(cfg.split, run.bounds, run.net, sample), launch.world_size)
    owned = groups[launch.rank]
    stages = [run.stages[k].to(device) for k in owned]
    source = run.raw("train", train=True)
    source.device = device
    return RankState(cfg, launch, device, groups, run.bounds, owned, stages, source, run.data)


def open_links(state: RankState, backend: str) -> None:
    """One two-rank process group per neighbour pair, so each direction has its own channel."""
    r, P, B = state.rank, state.launch.world_size, state.cfg.buffer_size
    pairs = [dist.new_group([i, i + 1], backend=backend) for i in range(P - 1)]
    if r > 0:
        state.inbox = Inbox(Link(r - 1, pairs[r - 1], state.device), B)
    if r < P - 1:
        state.outbox = Outbox(Link(r + 1, pairs[r], state.device), B)
        state.tap = OutputTap(state.stages[-1])


def make_rank_trainers(state: RankState) -> list[Trainer]:
    cfg, K = state.cfg, len(state.bounds) - 1
    total = cfg.epochs * state.source.steps_per_epoch()
    return [make_trainer(st, cfg, k, K, total) for k, st in zip(state.owned, state.stages)]


def train_rank(state: RankState, trainers: list[Trainer], progress: bool,
               log: RunLog | None = None, first_epoch: int = 0, checkpoint=None) -> None:
    """This rank's share of the parallel regime: the shared `train_epochs` on a stream, from
    `first_epoch` (a resumed run); after every epoch `checkpoint(epoch, summary)`, then a
    line in `log` (rank 0's RUN_DIR/log.jsonl) for this rank's modules."""
    cfg = state.cfg
    src = StreamSource(state.source if state.inbox is None else None, state.inbox,
                       state.source.steps_per_epoch(), state.tap, state.outbox,
                       memory_format(state.device, state.cfg.memory_format))
    train_epochs(trainers, src, cfg.epochs - first_epoch, cfg, first_epoch=first_epoch,
                 desc="parallel (rank 0)", progress=progress and state.rank == 0,
                 on_epoch_end=epoch_logger(log, list(state.owned), then=checkpoint))


def evaluate_rank(state: RankState) -> list[dict]:
    """Validation and test figures of this rank's modules, streaming both splits through."""
    out = {}
    for name, phase in (("val", PHASE_VAL), ("test", PHASE_TEST)):
        split = getattr(state.data, name)
        n = -(-len(split) // state.cfg.batch_size)
        if state.inbox is None:
            src = RawSource(state.data, split, state.cfg.batch_size, state.device, train=False).epoch()
        else:
            fmt = memory_format(state.device, state.cfg.memory_format)
            src = received(state.inbox, phase, n, fmt)
        stream = forward_stream(src, state.tap, state.outbox, phase)
        out[name] = evaluate_chain(state.stages, stream, state.cfg.precision)
    return [{"val_acc": v["acc"], "val_loss": v["loss"], "test_acc": t["acc"], "test_loss": t["loss"]}
            for v, t in zip(out["val"], out["test"])]


def close_links(state: RankState) -> None:
    if state.outbox is not None:
        state.outbox.close(state.launch.timeout_s)
    if state.inbox is not None:
        state.inbox.close()
    if state.tap is not None:
        state.tap.remove()


def module_entries(state: RankState, trainers: list[Trainer], evals: list[dict]) -> list[dict]:
    """Per-module figures with the keys of the single-process metrics.json, plus the rank."""
    return [module_entry(k, tr.record(), ev, rank=state.rank)
            for k, tr, ev in zip(state.owned, trainers, evals)]


def rank_report(state: RankState, trainers: list[Trainer], evals: list[dict]) -> dict:
    return {"rank": state.rank, "modules": module_entries(state, trainers, evals),
            "train_s": state.timings["train_s"], "peak_rss_mib": peak_rss_mib(),
            "num_threads": torch.get_num_threads()}


def assemble_metrics(state: RankState, reports: list[dict], backend: str) -> dict:
    """The single-process metrics.json layout, filled from every rank's report."""
    modules = [m for rep in reports for m in rep["modules"]]
    train_s = max(rep["train_s"] for rep in reports)
    n_train = len(state.data.train) * state.cfg.epochs
    record = metrics_record(
        state.cfg.mode, state.bounds, modules,
        max_resident=max(len(g) for g in state.groups),
        peak_rss_mib=max(rep["peak_rss_mib"] for rep in reports),
        timings={"train_s": train_s, "per_rank_train_s": [rep["train_s"] for rep in reports]},
        device=str(state.device), precision=state.cfg.precision,
        distributed={"world_size": len(reports), "backend": backend,
                     "buffer_size": state.cfg.buffer_size, "rank_modules": state.groups,
                     "train_images": n_train, "images_per_s": n_train / train_s,
                     "per_rank_peak_rss_mib": [rep["peak_rss_mib"] for rep in reports],
                     "num_threads": [rep["num_threads"] for rep in reports]})
    if data_record(state.data) is not None:  # an image folder: as a single-process run's
        record["data"] = data_record(state.data)
    return record


# ----------------------------------------------------------------------------- entry point

def _init_group(launch: Launch, backend: str) -> None:
    try:
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=launch.timeout_s))
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"rank {launch.rank}: cannot join the process group at "
                        f"{launch.master_addr}:{launch.master_port} ({first_line(e)})") from None


def _start_run_dir(state: RankState, out_dir: Path, resume: bool) -> tuple[Path, dict | None]:
    """Rank 0 creates the run directory and writes config.json (or, resuming, takes its lock
    and reads state.json); every rank learns the path and the state (rank 0's) or rank 0's
    error, so a bad --out stops all ranks."""
    msg = {"out": str(out_dir), "error": None, "state": None}
    if state.rank == 0:
        try:
            if resume:
                msg["state"] = _resume_state(state, Path(out_dir))
            else:
                state.lock = claim_out_dir(out_dir)  # rank 0 holds the run directory
                state.cfg.save(Path(out_dir) / "config.json")
                write_preprocessing(Path(out_dir), state.data)
        except UserError as e:
            msg["error"] = str(e)
    msg = broadcast_json(msg, state.device)
    if msg["error"] is not None:
        raise UserError(msg["error"] if state.rank == 0 else f"rank 0 could not start: {msg['error']}")
    return Path(msg["out"]), msg["state"]


def _resume_state(state: RankState, out: Path) -> dict:
    """Rank 0: the lock and the checked state.json of the run to continue."""
    state.lock = lock_run_dir(out)
    saved = read_state(out)
    if saved is None or saved.get("regime") != "distributed":
        raise UserError(f"{out} holds no distributed checkpoint; cannot resume it under torchrun")
    check_config(saved, state.cfg, out)
    if saved.get("world_size") != state.launch.world_size:
        raise UserError(f"{out} was trained by {saved.get('world_size')} processes; resume it "
                        f"with torchrun --nproc_per_node {saved.get('world_size')}")
    return saved


def _run_rank(state: RankState, out_dir: Path, backend: str, progress: bool, resume: bool,
              stop) -> dict | None:
    out, resumed = _start_run_dir(state, out_dir, resume)
    if resumed is not None and resumed.get("finished"):  # killed after the last commit
        return json.loads((out / "metrics.json").read_text()) if state.rank == 0 else None
    open_links(state, backend)
    trainers = make_rank_trainers(state)
    ck = RankCheckpoint(state, out, trainers, resumed, stop)
    first = ck.begin()
    comm("the start barrier", dist.barrier)
    log = RunLog(out / LOG, state.cfg.epochs, len(state.data.train)) if state.rank == 0 else None
    try:
        train_rank(state, trainers, progress, log, first, lambda e, _summary: ck.save(e + 1))
    except EpochStop as s:
        close_links(state)
        name, code = getattr(stop, "name", "stop requested"), getattr(stop, "exit_code", 130)
        raise Stopped(f"{name}: stopped after epoch {s.epoch}/{state.cfg.epochs}, checkpoint "
                      f"written; resume with: torchrun --nproc_per_node "
                      f"{state.launch.world_size} -m edgetrain.cli train --resume {out}", code) from None
    state.timings["train_s"] = ck.seconds()
    evals = evaluate_rank(state)
    close_links(state)
    reports = all_gather_json(rank_report(state, trainers, evals), state.device)
    metrics = assemble_metrics(state, reports, backend) if state.rank == 0 else None
    if state.rank == 0:
        atomic_write_json(out / "metrics.json", metrics)
        ck.write_state(state.cfg.epochs, None, finished=True)
    comm("the final barrier", dist.barrier)  # finished: the optimizer state may leave the files
    for k, st in zip(state.owned, state.stages):
        save_module(out, k, st, {"edgetrain_version": __version__, "index": k})
    return metrics


def train_distributed(cfg: RunConfig, out_dir: Path, launch: Launch | None,
                      progress: bool = False, stop=None, resume: bool = False) -> dict | None:
    """Train this rank's modules of a parallel run launched by torchrun.

    Args:
        cfg: the run's configuration (`mode` parallel, `distributed` true).
        out_dir: the run directory (rank 0's value is used by every rank).
        launch: this process's place in the launch (`launch_from_env`).
        progress: show a progress bar on rank 0.
        stop: a stop request (`edgetrain.signals.StopSignals`), agreed on at epoch boundaries.
        resume: continue the run in `out_dir` from its last epoch checkpoint.

    Returns:
        The metrics (as written to metrics.json) on rank 0; None on the other ranks.

    Raises:
        UserError: no launch, more processes than modules, a bad configuration or --out, or
            a peer rank that stopped or timed out (the others then stop too).
    """
    if launch is None:
        launch_from_env({})  # raises the message that names the missing variables
    device, backend = choose_device(cfg, launch)
    check_precision(cfg.precision, device)  # fp16 off CUDA, bf16 unsupported: before any wait
    state = plan_rank(cfg, launch, device)  # raises before any rank waits for another
    _init_group(launch, backend)
    try:
        metrics = _run_rank(state, out_dir, backend, progress, resume, stop)
    except Stopped:
        raise
    except UserError as e:  # PeerLost included: this rank stops too
        raise UserError(f"rank {launch.rank}: {e}") from None
    finally:
        if state.lock is not None:
            state.lock.release()
    dist.destroy_process_group()
    return metrics
