"""Out-of-core sequential and multi-lap training with crash-safe checkpoints and resume.

One module (plus its head) is resident at a time, through `ModuleStore`. Module 0 trains
on live-augmented raw batches; module k > 0 streams cache k, written by one no-grad,
eval-mode pass of module k-1 over cache k-1 (or the raw data). In the last lap every module
is evaluated on validation and test caches right after it is trained, so per-module accuracy
needs one module in memory.

Cache lifetime (the deletion rule): cache k is written after module k-1 is trained (and
evaluated) and is deleted as soon as cache k+1 is complete, or after module k is trained and
evaluated when k is the last module. At most two caches exist at once; none is left at the end.
Each lap rebuilds every cache; a cache is read only if its key (data, seed, views, dtype and
the digests of the producing modules' weights, read from the module store) matches.

Checkpoints, all written atomically: at every epoch boundary module k's file gets its weights,
optimizer, tau state, step, history and `progress` (lap, epochs done in that lap), then
`state.json` gets the cursor (lap, module, epoch), RNG states, per-module summaries, the
config hash and the version. The data order needs no saved state: it is a pure function of
(seed, module, epoch). On resume the module file's `progress` says how many epochs of the
cursor's module are done, so a kill between the two writes loses nothing; a cache that is
missing, incomplete or fails its checksum is rebuilt from the module store.

This file does not parse argv and does not know e2e or parallel training.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
import shutil
import time

import torch

from edgetrain import __version__
from edgetrain.budget.guard import budget_guard
from edgetrain.data.batches import augment, batch_indices, epoch_generator
from edgetrain.measure import PhaseRecorder
from edgetrain.method.loop import (Interrupted, NonFiniteLoss, Trainer, add_scores,
                                  evaluate_chain, make_trainer, new_scores, progress_bar, scores,
                                  step_hook, train_epoch)
from edgetrain.method.precision import autocast, compute_input
from edgetrain.regimes.run import Run, run_metrics, stopped
from edgetrain.storage.atomic import atomic_write_json
from edgetrain.storage.cache import (CacheInvalid, CacheOverflow, CacheReader, CacheSource,
                                     CacheWriter, check_free_space, digest, planned_bytes,
                                     remove_cache, sequential_rows)
from edgetrain.storage.modules import ModuleStore
from edgetrain.storage.rundir import (STATE, config_hash, remove_temporaries, rng_state,
                                      set_rng_state)
from edgetrain.units import MIB

VIEW_SALT = 7_777  # the salt of the augmentation streams of cached views
log = logging.getLogger("edgetrain")


class OutOfCore:
    """Drives one out-of-core run: the module/lap loop, caches, checkpoints and resume."""

    def __init__(self, run: Run, out: Path, progress: bool = False):
        self.run, self.cfg, self.out, self.progress = run, run.cfg, Path(out), progress
        self.K, self.R, self.E = run.n_modules, run.cfg.n_laps, run.cfg.epochs_per_lap
        self.store = ModuleStore(self.out, run.stages, run.device)
        root = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "cache"
        if self.cfg.cache_dir:
            root = root / ("run-" + hashlib.sha256(str(self.out.resolve()).encode()).hexdigest()[:12])
        self.cache_root = root
        self.raw = run.raw("train", train=True)
        self.total_steps = self.cfg.epochs * self.raw.steps_per_epoch()
        self.prefetch_bytes = int(self.cfg.prefetch_mib * MIB)
        self.verified: dict = {}  # (shard, sha256) -> the stat its checksum was checked at
        self.views = self.cfg.cache_views if self.cfg.augment else 1
        self.state = {"edgetrain_version": __version__, "config_sha256": config_hash(self.cfg),
                      "seq": 0, "cursor": {"lap": 0, "module": 0, "epoch": 0},
                      "modules": {}, "train_s": 0.0, "finished": False}
        self._t0 = time.perf_counter()
        self._base_s = 0.0
        self._memo: dict = {}
        # wall seconds of the cache pass in this process: caches written outside evaluation
        # (in a run from the start, the training split's); metrics.json timings.cache_pass_s
        self.cache_pass_s = 0.0
        # --train-modules A:B: the frozen prefix (modules < A-1) trains its new heads in lap 1
        # only, and cache A-1 (its output) is kept across laps: the prefix is never reloaded
        self.first_trained = self.cfg.train_modules[0] - 1 if self.cfg.train_modules else 0
        self.keep_cache = self.first_trained if self.first_trained > 0 and self.R > 1 else None

    # ------------------------------------------------------------------ state
    def write_state(self, lap: int, module: int, epoch: int) -> None:
        """Atomically write state.json with the cursor (lap, module, epoch) and RNG states."""
        s = self.state
        s["seq"] += 1
        s["cursor"] = {"lap": lap, "module": module, "epoch": epoch}
        s["rng"] = rng_state()
        s["train_s"] = self._base_s + time.perf_counter() - self._t0
        s["max_resident_modules"] = max(s.get("max_resident_modules", 0), self.store.max_resident)
        atomic_write_json(self.out / STATE, s)

    def start(self, state: dict | None) -> None:
        """Fresh start (state None: write initial module files) or continue from `state`."""
        remove_temporaries(self.out)
        if state is None:
            self.store.adopt(write=True)
            self.write_state(0, 0, 0)
            return
        self.store.adopt(write=False)
        keep = ("seq", "cursor", "modules", "finished", "max_resident_modules")
        self.state.update({k: state[k] for k in keep if k in state})
        self._base_s = float(state.get("train_s", 0.0))
        if "rng" in state:
            set_rng_state(state["rng"])

    # ------------------------------------------------------------------ caches
    def cache_dir(self, k: int, split: str) -> Path:
        """Directory of cache k (the input of module k) for `split`."""
        return self.cache_root / f"c{k:02d}" / split

    def data_key(self, split: str) -> str:
        if ("data", split) not in self._memo:
            self._memo[("data", split)] = self._data_key(split)
        return self._memo[("data", split)]

    def weights_digest(self, j: int) -> str:
        """Digest of module j's weights as stored (memoised on the file's identity)."""
        st = self.store.path(j).stat()
        ident = ("w", j, st.st_mtime_ns, st.st_size, st.st_ino)
        if ident not in self._memo:
            self._memo[ident] = self.store.weights_digest(j)
        return self._memo[ident]

    def _data_key(self, split: str) -> str:
        sp = getattr(self.run.data, split)
        h = hashlib.sha256()  # the pack (its key names source and policy) and the rows taken
        h.update(sp.reader.manifest["key"].encode())
        for values in (sp.index, sp.y):  # as int64 (the key of before int32), in chunks
            for part in values.split(1 << 16):
                h.update(part.long().numpy().tobytes())
        views = self.views if split == "train" else 1
        return digest(h.hexdigest(), split, self.cfg.seed, self.cfg.augment and split == "train",
                      views, self.run.data.mean, self.run.data.std)

    def cache_key(self, k: int, split: str) -> str:
        """Key of cache k: chains the data key with modules 0..k-1's weight digests."""
        key = self.data_key(split)
        for j in range(k):
            key = digest(key, self.weights_digest(j), self.cfg.cache_dtype, self.cfg.batch_size)
        return key

    def open_cache(self, k: int, split: str) -> CacheReader:
        """A verified reader of cache k (raises `CacheInvalid` if stale, incomplete or corrupt)."""
        return CacheReader(self.cache_dir(k, split), self.cache_key(k, split), self.verified)

    def _valid(self, k: int, split: str) -> bool:
        try:
            self.open_cache(k, split).close()
            return True
        except CacheInvalid as e:
            if self.cache_dir(k, split).exists():
                log.warning("%s; rebuilding it from the module store", e)
            return False

    def ensure_cache(self, k: int, splits: list[str]) -> None:
        """Make caches k of `splits` valid, rebuilding from the module store as needed."""
        missing = [s for s in splits if not self._valid(k, s)]
        if not missing:
            return
        if k > 1:
            self.ensure_cache(k - 1, missing)
        stage = self.store.load(k - 1)
        for s in missing:
            t0 = time.perf_counter()
            with self._phase("cache_write"), self._phase(f"module_{k - 1:02d}_cache_write"):
                self._write(k, s, stage)
            self.cache_pass_s += time.perf_counter() - t0
            if k > 1 and k - 1 != self.keep_cache:
                remove_cache(self.cache_dir(k - 1, s))

    def _inputs(self, k: int, split: str):
        """Batches (in sample order, view-major) that module k-1 turns into cache k."""
        if k > 1:
            reader = self.open_cache(k - 1, split)
            return reader.n, reader.views, sequential_rows(reader, self.cfg.batch_size,
                                                           self.prefetch_bytes,
                                                           self.run.memory_format)
        sp = getattr(self.run.data, split)
        views = self.views if split == "train" else 1
        return len(sp), views, self._raw_views(sp, views)

    def _raw_views(self, sp, views: int):
        """View 0 is the clean data; views 1.. are augmented (seeded per view)."""
        data = self.run.data
        for v in range(views):
            gen = epoch_generator(self.cfg.seed, VIEW_SALT, v)
            for idx in batch_indices(len(sp), self.cfg.batch_size, False, None):
                x = data.normalize(sp.rows(idx))
                yield augment(x, gen, data.flip) if v > 0 else x

    @torch.no_grad()
    def _write(self, k: int, split: str, stage, labels: torch.Tensor | None = None) -> dict | None:
        """Write cache k of `split`: module k-1 (`stage`, eval mode) over its inputs.

        With `labels` (the split's, in sample order; val and test hold one view), the same
        pass also evaluates `stage` with its head, as `evaluate_chain` does, and returns
        {"acc", "loss"}: module k-1's evaluation and cache k come from one forward (#29)."""
        n, views, batches = self._inputs(k, split)
        stage.eval()
        writer, acc = None, new_scores()
        for x in batches:
            with autocast(self.cfg.precision, self.run.device):  # stored in --cache-dtype
                z = stage.features(compute_input(x.to(self.run.device), self.cfg.precision))
                if labels is not None:  # rows come in sample order: the labels are a slice
                    add_scores(acc, stage.head(z),
                               labels[acc["n"]:acc["n"] + len(z)].to(self.run.device, torch.int64))
            if writer is None:
                need = planned_bytes(n * views, tuple(z.shape[1:]), self.cfg.cache_dtype)
                check_free_space(self.cache_root, need, f"the activation cache of module {k + 1} "
                                 f"({split}, {n * views} rows)")
                writer = CacheWriter(self.cache_dir(k, split), self.cache_key(k, split),
                                     tuple(z.shape[1:]), self.cfg.cache_dtype, n, views,
                                     shard_bytes=max(MIB, self.prefetch_bytes // 4),
                                     durable=False, verified=self.verified)
            try:
                writer.add(z)
            except CacheOverflow as e:
                raise CacheOverflow(f"module {k}'s outputs (the {split} activation cache of "
                                    f"module {k + 1}): {e}; "
                                    f"the trained modules in {self.out} are kept") from None
        writer.close()
        return scores(acc) if labels is not None else None

    def source(self, k: int, split: str, train: bool):
        """The batches module k sees: raw data for module 0, cache k for the others."""
        if k == 0:
            return self.raw if train else self.run.raw(split)
        labels = getattr(self.run.data, split).y
        return CacheSource(self.open_cache(k, split), labels, self.cfg.batch_size,
                           self.run.device, train=train, seed=self.cfg.seed,
                           prefetch_bytes=self.prefetch_bytes,
                           memory_format=self.run.memory_format)

    # ------------------------------------------------------------------ training
    def trainer(self, k: int) -> tuple[Trainer, dict]:
        """Module k with its trainer, and its file's `progress`: lap, epochs done in that
        lap, and for a mid-epoch checkpoint the batches done (`position`) and `partial` sums."""
        stage = self.store.load(k)
        tr = make_trainer(stage, self.cfg, k, self.K, self.total_steps)
        self.store.restore_trainer(k, tr)
        meta = self.store.meta(k)
        return tr, json.loads(meta.get("progress", '{"lap": -1, "epochs": 0}'))

    def train_module(self, lap: int, k: int) -> Trainer:
        """Train module k for the epochs of lap `lap` not done yet, checkpointing each."""
        if k > 0:
            self.ensure_cache(k, ["train"])
        tr, prog = self.trainer(k)
        if int(prog["lap"]) != lap:
            prog = {"lap": lap, "epochs": 0}
        done = int(prog["epochs"])
        if done >= self.E or tr.opt is None:  # None: frozen with a loaded head
            return tr
        src = self.source(k, "train", train=True)
        for e in range(done, self.E):
            first, desc = e == done, self.describe(lap, k, e)
            if self.run.log is not None:
                self.run.log.mark()
            with self.checkpoint_on_stop(tr, lap, k, e, desc), \
                    progress_bar(src.steps_per_epoch(), desc, self.progress) as bar:
                summary = train_epoch([tr], src, lap * self.E + e, self.cfg, salt=k,
                                      on_step=step_hook(bar, self.run.step_check),
                                      skip=int(prog.get("position", 0)) if first else 0,
                                      partial=prog.get("partial") if first else None,
                                      stop=self.run.stop)
            self.end_epoch(tr, lap, k, e, summary)
        return tr

    def describe(self, lap: int, k: int, e: int) -> str:
        """'lap 1/2 module 3/4 epoch 5': the progress bar's and the messages' name of it."""
        return f"lap {lap + 1}/{self.R} module {k + 1}/{self.K} epoch {lap * self.E + e + 1}"

    @contextlib.contextmanager
    def checkpoint_on_stop(self, tr: Trainer, lap: int, k: int, e: int, desc: str):
        """Name the place of a non-finite loss; on a stop request, write the mid-epoch
        checkpoint and raise the one-line `Stopped`."""
        try:
            yield
        except NonFiniteLoss as ex:
            raise NonFiniteLoss(f"module {k + 1}/{self.K}, lap {lap + 1}/{self.R}, epoch "
                                f"{lap * self.E + e + 1}: {ex}; the last checkpoint in "
                                f"{self.out} is kept") from None
        except Interrupted as it:
            prog = {"lap": lap, "epochs": e, "position": it.position, "partial": it.partial}
            self.store.save(k, tr, meta={"progress": json.dumps(prog)})
            self.write_state(lap, k, e)
            raise stopped(self.run, self.out, f"in {desc} after batch {it.position}") from None

    def end_epoch(self, tr: Trainer, lap: int, k: int, e: int, summary: list[dict]) -> None:
        """The epoch's checkpoint (module file, state.json), then its line in log.jsonl."""
        seconds = self.run.log.since_mark() if self.run.log is not None else 0.0
        self.store.save(k, tr, meta={"progress": json.dumps({"lap": lap, "epochs": e + 1})})
        self.write_state(lap, k, e + 1)
        if self.run.log is not None:  # after the checkpoint: a logged epoch is never redone
            self.run.log.epoch(lap=lap, module=k, epoch=lap * self.E + e, summary=summary,
                               seconds=seconds)

    def finish_module(self, lap: int, k: int, tr: Trainer) -> None:
        """After module k of lap `lap`: evaluate (last lap), write cache k+1, drop cache k."""
        last_lap = lap == self.R - 1
        final = last_lap or k < self.first_trained  # the frozen prefix is final after lap 1
        if k + 1 < self.K:
            self.ensure_cache(k + 1, ["train"])
        if final:  # val and test: module k's evaluation also writes cache k+1 (`_write`)
            self.state["modules"][str(k)] = self._summary(k, tr)
        if k > 0 and (k != self.keep_cache or last_lap):
            for s in ("train", "val", "test"):
                remove_cache(self.cache_dir(k, s))
        nxt = (lap, k + 1) if k + 1 < self.K else (lap + 1, 0)
        self.write_state(nxt[0], nxt[1], 0)

    def _summary(self, k: int, tr: Trainer) -> dict:
        """Module k's validation and test accuracy and loss, with its training record; when
        a module follows, the same eval-mode pass writes its val / test cache (one forward
        of module k over each split, not two)."""
        if k > 0:
            self.ensure_cache(k, ["val", "test"])
        stage = self.store.load(k)
        ev = {}
        for split in ("val", "test"):
            with self._phase("eval"), self._phase(f"module_{k:02d}_eval"):
                if k + 1 < self.K and not self._valid(k + 1, split):
                    with self._phase("cache_write"), \
                            self._phase(f"module_{k:02d}_cache_write"):
                        r = self._write(k + 1, split, stage,
                                        labels=getattr(self.run.data, split).y)
                else:
                    (r,) = evaluate_chain([stage], self.source(k, split, train=False).epoch(),
                                          self.cfg.precision)
            ev[f"{split}_acc"], ev[f"{split}_loss"] = r["acc"], r["loss"]
        return {**ev, **tr.record()}

    def run_all(self) -> None:
        """Every remaining (lap, module) from the cursor, then the final module files."""
        cur = self.state["cursor"]
        for lap in range(cur["lap"], self.R):
            first = cur["module"] if lap == cur["lap"] else 0
            for k in range(first, self.K):
                if lap > 0 and k < self.first_trained:  # the frozen prefix: done in lap 1
                    continue
                with self._phase(f"module_{k:02d}_train"):
                    tr = self.train_module(lap, k)
                self.finish_module(lap, k, tr)
                del tr  # its optimizer state must not outlive the module (one resident)
        for k in range(self.K):
            self.store.strip(k)
        for k in range(self.K):
            self.store.release(k)
        self.state["finished"] = True
        self.write_state(self.R, 0, 0)
        if self.cache_root.exists():  # RUN_DIR/cache or this run's folder under --cache-dir
            shutil.rmtree(self.cache_root)

    def _phase(self, name: str):
        """A per-phase memory record (`metrics.json` "memory"), or nothing without a recorder."""
        rec = self.run.memory
        return rec.phase(name) if rec is not None else contextlib.nullcontext()

    def summaries(self) -> list[dict]:
        """Per-module records (history, tau, step, blocks, val/test accuracy and loss)."""
        return [self.state["modules"][str(k)] for k in range(self.K)]


def train_out_of_core(run: Run, out: Path, progress: bool = False, state: dict | None = None
                      ) -> dict:
    """Train a sequential / multilap run with one module resident, fresh or resumed; writes
    and returns metrics.json.

    Args:
        run: the built run (its stages are handed to the module store and released).
        out: the run directory (config.json already written).
        progress: show a progress bar.
        state: the state.json of an interrupted run to continue, or None for a fresh start.
    Raises:
        UserError: disk full, non-finite loss (NonFiniteLoss), unusable cache directory.
    """
    run.memory = run.memory or PhaseRecorder(run.device)
    with budget_guard(run), run.memory.phase("train"):
        ooc = OutOfCore(run, out, progress)
        ooc.start(state)
        if not ooc.state["finished"]:
            ooc.run_all()
    resident = max(ooc.store.max_resident, ooc.state.get("max_resident_modules", 0))
    summaries = ooc.summaries()
    evals = [{k: s[k] for k in ("val_acc", "val_loss", "test_acc", "test_loss")} for s in summaries]
    metrics = run_metrics(run, summaries, evals, float(ooc.state["train_s"]),
                          max_resident=resident)
    metrics["timings"]["cache_pass_s"] = ooc.cache_pass_s
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
