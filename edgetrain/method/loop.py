"""The one inner loop shared by every regime, batch sources and evaluation.

`train_epoch(trainers, source, epoch, cfg)` trains a chain of stages for one epoch of
`source` (`train_step` per batch): one stage for sequential/multilap (the module being trained) and for e2e (the
whole network as one stage); all stages for parallel, each stage fed the detached output
of the one before it. No gradient ever crosses a stage boundary.

A batch source yields normalised (x, y) batches on the device, one epoch at a time, and
is deterministic for a given (seed, salt, epoch): `RawSource` reads the data set with live
augmentation, `PrefixSource` runs a frozen prefix (eval mode, no_grad) over it on the fly.
The out-of-core cache (`edgetrain.storage.cache`) provides the same interface.

`train_epochs` runs several epochs of it under one progress bar (`progress_bar`) with a
check after every step (`step_hook`: the memory-budget watchdog); the out-of-core regime
calls `train_epoch` once per checkpointed epoch.
Every forward here (training, the frozen prefix, evaluation) runs under
`edgetrain.method.precision.autocast`; losses are computed in float32.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
import math
import time
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from edgetrain.config import RunConfig
from edgetrain.data.batches import augment, batch_indices, epoch_generator
from edgetrain.data.splits import DataSplits, Split
from edgetrain.errors import UserError
from edgetrain.method.freeze import trainable_parameters
from edgetrain.method.precision import autocast, compute_input, make_scaler
from edgetrain.method.stage import Stage
from edgetrain.method.transport import LossWeighting, tau_for_module
from edgetrain.storage.cache import prefetch
from edgetrain.units import MIB


class BatchSource(Protocol):
    def epoch(self, epoch: int, salt: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def steps_per_epoch(self) -> int: ...


@dataclass
class RawSource:
    """Batches of a data split, streamed from its pack, normalised, with live augmentation
    when `train`.

    The epoch's order (a seeded permutation of the split's rows) is drawn first; a background
    thread reads the batches' uint8 rows by pread, at most `prefetch_bytes` ahead; the
    consumer normalises and augments from the same generator, so the batches are those of
    the in-memory path, bit for bit.
    """

    data: DataSplits
    split: Split
    batch_size: int
    device: torch.device
    train: bool = True
    augment: bool = True
    seed: int = 0
    prefetch_bytes: int = 64 * MIB

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def _max_batches(self) -> int:
        return max(1, self.prefetch_bytes // max(1, self.batch_size * math.prod(self.data.input_shape)))

    def epoch(self, epoch: int = 0, salt: int = 0):
        gen = epoch_generator(self.seed, salt, epoch)
        order = list(batch_indices(len(self.split), self.batch_size, self.train, gen))
        rows = ((self.split.rows(idx), idx) for idx in order)
        for xb, idx in prefetch(rows, self._max_batches()):
            x = self.data.normalize(xb.to(self.device))
            if self.train and self.augment:
                x = augment(x, gen, self.data.flip)
            yield x, self.split.labels(idx).to(self.device)


@dataclass
class PrefixSource:
    """Runs frozen stages (eval mode, no_grad) over another source's batches: the
    recompute path of the reference code, kept as the baseline of the cache."""

    inner: BatchSource
    prefix: list[Stage]
    precision: str = "fp32"

    def steps_per_epoch(self) -> int:
        return self.inner.steps_per_epoch()

    def epoch(self, epoch: int = 0, salt: int = 0):
        for st in self.prefix:
            st.eval()
        for x, y in self.inner.epoch(epoch, salt):
            with torch.no_grad(), autocast(self.precision, x.device):
                x = compute_input(x, self.precision)
                for st in self.prefix:
                    x = st.features(x)
            yield x, y


@dataclass
class Trainer:
    """One stage's optimiser, transport weighting and learning-rate schedule (by step)."""

    stage: Stage
    opt: torch.optim.Optimizer | None  # None: nothing of the stage trains (frozen, loaded head)
    weighting: LossWeighting
    base_lr: float
    total_steps: int
    cosine: bool
    step: int = 0
    history: list = field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None  # fp16 on CUDA: the optimizer's loss scaler
    loss_fn: Callable | None = None  # --compile: `stage_loss` compiled for this trainer

    def record(self) -> dict:
        """What metrics.json keeps of the training: history, tau (None when the stage
        trains without the transport penalty: VanGL, e2e, a head alone), step, blocks."""
        tau = self.weighting.effective_tau if self.weighting.transport else None
        return {"history": self.history, "tau": tau,
                "step": self.step, "blocks": len(self.stage.blocks)}

    def set_lr(self) -> None:
        lr = self.base_lr
        if self.cosine and self.total_steps > 0:
            lr = 0.5 * self.base_lr * (1 + math.cos(math.pi * min(self.step, self.total_steps)
                                                    / self.total_steps))
        for g in self.opt.param_groups if self.opt is not None else []:
            g["lr"] = lr


def make_optimizer(params, cfg: RunConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def make_trainer(stage: Stage, cfg: RunConfig, k: int, n_modules: int, total_steps: int,
                 transport: bool | None = None) -> Trainer:
    """Trainer for stage k of n_modules; `transport` overrides cfg.transport (e2e: False).

    Only parameters that require gradients get optimizer state; a stage whose body is frozen
    trains its head without transport, and a wholly frozen stage gets no optimizer at all.
    """
    on = (cfg.transport if transport is None else transport) and stage.body_trainable
    w = LossWeighting(on, tau_for_module(k, n_modules, cfg.tau, cfg.tau_schedule),
                      cfg.tau_schedule, cfg.mult_h, cfg.mult_s, cfg.mult_lambda1)
    params = trainable_parameters(stage)
    opt = make_optimizer(params, cfg) if params else None
    scaler = make_scaler(cfg.precision, params[0].device) if params else None
    tr = Trainer(stage, opt, w, cfg.lr, total_steps, cfg.cosine, scaler=scaler)
    if cfg.compile:
        from edgetrain.method.compiled import compiled_stage_loss  # torch._dynamo: deferred
        tr.loss_fn = compiled_stage_loss(stage_loss, tr, cfg.data_cache)
    return tr


class NonFiniteLoss(UserError):
    """A NaN or infinite loss: training stops, the last good checkpoint stays."""


def stage_loss(tr: Trainer, x, y, label_smoothing: float, scaling: str, precision: str = "fp32"):
    """Forward of one stage and its loss; returns (total, ce, w, logits, z).

    TRGL differentiates the transport cost w (`Stage.forward_transport`, no residue saved
    beyond what the blocks save); VanGL and e2e compute it as a detached statistic
    (`Stage.forward_statistic`). total = `tr.weighting.combine(ce, w)`. The forward runs
    under `autocast(precision)`; ce and w are float32 whatever the precision. Also run on
    meta tensors by the memory predictor (`edgetrain.budget.simulate`), so nothing here
    reads values.
    """
    with autocast(precision, x.device):
        x = compute_input(x, precision)
        if tr.weighting.transport:
            z, w = tr.stage.forward_transport(x, scaling)
        else:
            z, w = tr.stage.forward_statistic(x, scaling)
        logits = tr.stage.head(z)
    ce = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    return tr.weighting.combine(ce, w), ce, w, logits, z


def train_step(trainers: list[Trainer], x: torch.Tensor, y: torch.Tensor,
               label_smoothing: float, scaling: str, precision: str = "fp32") -> list[dict]:
    """One optimiser step of every trainer on a chain; returns per-stage statistics."""
    stats, y = [], y.long()  # the losses take int64 (a split holds its labels in int32)
    for tr in trainers:
        t0 = time.perf_counter()
        tr.stage.train()
        tr.set_lr()
        with torch.no_grad() if tr.opt is None else nullcontext():  # wholly frozen: forward only
            total, ce, w, logits, z = (
                tr.loss_fn(x, y, label_smoothing, scaling, precision) if tr.loss_fn is not None
                else stage_loss(tr, x, y, label_smoothing, scaling, precision))
        if not torch.isfinite(total):
            raise NonFiniteLoss(f"non-finite loss ({float(total.detach())}) at step {tr.step + 1}")
        if tr.opt is not None:
            optimizer_step(tr, total)
        tr.weighting.after_step()
        tr.step += 1
        stats.append({"loss": float(ce.detach()), "transport": float(w.detach()),
                      "correct": int((logits.argmax(1) == y).sum()), "n": len(y),
                      "seconds": time.perf_counter() - t0})
        x = z.detach()  # the boundary: nothing flows back into the stage before
        del logits, z, ce, w, total  # free them before the next stage's forward
    return stats


def optimizer_step(tr: Trainer, total: torch.Tensor) -> None:
    """Backward and update; with a loss scaler (fp16), the scaled loss, and a step that is
    skipped when the scaled gradients overflowed."""
    tr.opt.zero_grad(set_to_none=True)
    if tr.scaler is None:
        total.backward()
        tr.opt.step()
        return
    tr.scaler.scale(total).backward()
    tr.scaler.step(tr.opt)
    tr.scaler.update()


class Interrupted(Exception):
    """A stop request seen at a step boundary of `train_epoch`: `position` batches of epoch
    `epoch` are done and `partial` holds that epoch's running sums (per stage). The regime
    that catches it writes a mid-epoch checkpoint; resuming with `skip=position` and
    `partial` replays the same batch order and augmentation draws."""

    def __init__(self, epoch: int, position: int, partial: list[dict]):
        super().__init__(f"stopped after batch {position} of epoch {epoch + 1}")
        self.epoch, self.position, self.partial = epoch, position, partial


def train_epoch(trainers: list[Trainer], source: BatchSource, epoch: int, cfg: RunConfig, *,
                salt: int = 0, on_step: Callable[[list[dict]], None] | None = None,
                skip: int = 0, partial: list[dict] | None = None,
                stop: Callable[[], bool] | None = None) -> list[dict]:
    """Train `trainers` for epoch `epoch` of `source`; returns the per-stage means (also
    appended to each trainer's history).

    `epoch` and `salt` select the deterministic batch order (for resuming and for distinct
    streams per module and lap). `skip` batches are drawn but not trained (a mid-epoch
    resume; their RNG draws replay), `partial` restores that epoch's running sums. The loss
    options and the forward's precision are the run's (`cfg`). `on_step(stats)` runs after
    every step, then `stop()`: when true, `Interrupted` is raised.
    """
    fresh = [{"loss": 0.0, "transport": 0.0, "correct": 0, "n": 0, "seconds": 0.0}
             for _ in trainers]
    acc = [{"seconds": 0.0, **a} for a in partial] if partial else fresh
    for i, (x, y) in enumerate(source.epoch(epoch, salt)):
        if i < skip:
            continue
        stats = train_step(trainers, x, y, cfg.label_smoothing, cfg.transport_scaling,
                           cfg.precision)
        for a, s in zip(acc, stats):
            a["loss"] += s["loss"] * s["n"]
            a["transport"] += s["transport"] * s["n"]
            a["correct"] += s["correct"]
            a["n"] += s["n"]
            a["seconds"] += s["seconds"]
        if on_step:
            on_step(stats)
        if stop is not None and stop():
            raise Interrupted(epoch, i + 1, acc)
    summary = [{"epoch": epoch, "train_loss": a["loss"] / max(a["n"], 1),
                "transport": a["transport"] / max(a["n"], 1),
                "train_acc": a["correct"] / max(a["n"], 1), "step_s": a["seconds"]}
               for a in acc]
    for tr, s in zip(trainers, summary):
        tr.history.append(s)
    return summary


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar of `total` steps (a context manager), or a null context giving None."""
    if not enabled:
        return nullcontext(None)
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def step_hook(bar, step_check: Callable[[], None] | None) -> Callable[[list[dict]], None]:
    """`on_step` for `train_epoch`: advance `bar` (if any), then `step_check()` (the
    memory-budget watchdog; it may raise between steps, where checkpoints are intact)."""
    def on_step(stats):
        if bar is not None:
            bar.update(1)
        if step_check is not None:
            step_check()
    return on_step


def train_epochs(trainers: list[Trainer], source: BatchSource, epochs: int, cfg: RunConfig, *,
                 first_epoch: int = 0, salt: int = 0, desc: str = "", progress: bool = False,
                 step_check: Callable[[], None] | None = None,
                 on_epoch_end: Callable[[int, list[dict]], None] | None = None,
                 skip: int = 0, partial: list[dict] | None = None,
                 stop: Callable[[], bool] | None = None) -> list[list[dict]]:
    """`epochs` epochs of `train_epoch` from `first_epoch` under one progress bar;
    `on_epoch_end(epoch, summary)` after each. `skip` and `partial` apply to the first epoch
    only (a mid-epoch resume); `stop` and `step_check` as in `train_epoch` / `step_hook`."""
    out = []
    with progress_bar(epochs * source.steps_per_epoch(), desc, progress) as bar:
        on_step = step_hook(bar, step_check)
        for e in range(first_epoch, first_epoch + epochs):
            first = e == first_epoch
            out.append(train_epoch(trainers, source, e, cfg, salt=salt, on_step=on_step,
                                   skip=skip if first else 0, partial=partial if first else None,
                                   stop=stop))
            if on_epoch_end:
                on_epoch_end(e, out[-1])
    return out


@torch.no_grad()
def evaluate_chain(stages: list[Stage], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   precision: str = "fp32") -> list[dict]:
    """Accuracy and loss of every prefix F_k o G_k over `batches` (all stages in eval mode),
    the forward under `autocast(precision)`, the loss in float32."""
    for st in stages:
        st.eval()
    acc = [new_scores() for _ in stages]
    for x, y in batches:
        with autocast(precision, x.device):
            x = compute_input(x, precision)
            for a, st in zip(acc, stages):
                logits, x = st(x)
                add_scores(a, logits, y)
    return [scores(a) for a in acc]


def new_scores() -> dict:
    """Running sums of an evaluation: correct predictions, summed loss, samples."""
    return {"correct": 0, "loss": 0.0, "n": 0}


def add_scores(acc: dict, logits: torch.Tensor, y: torch.Tensor) -> None:
    """Add one batch to `acc`: its correct predictions, its float32 cross-entropy summed
    over the batch, its size."""
    acc["correct"] += int((logits.argmax(1) == y).sum())
    acc["loss"] += float(F.cross_entropy(logits.float(), y, reduction="sum"))
    acc["n"] += len(y)


def scores(acc: dict) -> dict:
    """Accuracy and mean loss of the running sums `acc`."""
    return {"acc": acc["correct"] / max(acc["n"], 1), "loss": acc["loss"] / max(acc["n"], 1)}
