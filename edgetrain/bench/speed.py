"""`edgetrain bench speed`: what the activation cache buys, measured as ratios in one run.

1. Sequential training of resnet56 on 3x32x32 synthetic data, same epochs, with the disk
   cache vs recomputing the frozen prefix for every batch (`PrefixSource`, the reference
   code's way): total wall time of `train` (training, cache writes and per-module
   evaluation), for each K.
2. Training one module (the middle one of the largest K) from the disk cache vs from the
   same cached activations held in RAM (same storage dtype, same batches): throughput. The
   disk figure is taken twice: with the shards in the page cache ("warm") and after evicting
   them with posix_fadvise(DONTNEED) before every epoch ("evicted").
3. Peak RSS of sequential training at N and 4N training samples, each in a fresh process,
   minus that process's RSS after its imports.
4. Accuracy on digits of the cache storage dtype (float16 vs float32) and of --cache-views
   (A = 1 vs 4), next to the in-memory path with live augmentation.

5. The regime table (`regimes`): every regime's `train()` wall and CPU time over end-to-end's
   on the same job and epochs (`total_over_e2e`, `cpu_over_e2e`), medians of paired rounds,
   for each of `REGIME_JOBS` (#29).
6. Where the time goes (`profile`): each regime's CPU seconds per phase under cProfile, and
   the heads' cost against the modules' bodies.
7. Where a training step's time goes (`steps`): the parallel step with and without the
   transport penalty and with linear heads, against e2e's, paired repetitions of one batch.
8. Heads in train()'s wall time (`heads`): parallel and sequential with `HEAD_ARMS`, paired
   with e2e in the same rounds.

Writes `speed.json` and `speed.md` to the output directory. Timings on a shared machine are
noisy: only ratios taken in the same run are reported. This file does not parse argv.
"""
from __future__ import annotations

import cProfile
import dataclasses
import json
import os
from pathlib import Path
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from edgetrain.config import RunConfig
from edgetrain.data.batches import batch_indices, epoch_generator
from edgetrain.method.loop import make_trainer, train_epochs, train_step
from edgetrain.regimes.out_of_core import OutOfCore
from edgetrain.regimes.resident import TRAINERS
from edgetrain.regimes.run import build_run
from edgetrain.regimes.schedule import train
from edgetrain.storage.atomic import atomic_write_text
from edgetrain.bench.results import write_result_json
from edgetrain.storage.cache import DTYPES

_RSS_CHILD = r"""
import json, sys
from pathlib import Path
import torch
from edgetrain.config import RunConfig
from edgetrain.measure import peak_rss_bytes
from edgetrain.regimes.schedule import train
from edgetrain.units import MIB
torch.set_num_threads(2)
def hwm():
    return peak_rss_bytes() / MIB
after_imports = hwm()
cfg = RunConfig.from_dict(json.loads(sys.argv[1]))
train(cfg, Path(sys.argv[2]))
print(json.dumps({"after_imports_mib": after_imports, "peak_mib": hwm()}))
"""


def speed_cfg(k: int, epochs: int, synthetic_size: int, cache_dtype: str, **kw) -> RunConfig:
    """resnet56, 3x32x32 synthetic, sequential, K modules."""
    base = dict(data="synthetic", input_shape=(3, 32, 32), synthetic_size=synthetic_size,
                model="resnet56", modules=k, mode="sequential", epochs=epochs, batch_size=64,
                cache_dtype=cache_dtype, seed=0, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def _timed_train(cfg: RunConfig, out: Path) -> float:
    t0 = time.perf_counter()
    train(cfg, out)
    return time.perf_counter() - t0


def cache_vs_recompute(tmp: Path, ks: list[int], epochs: int, synthetic_size: int,
                       cache_dtype: str) -> list[dict]:
    """Total sequential training time, cache vs recompute, per K."""
    rows = []
    for k in ks:
        cfg = speed_cfg(k, epochs, synthetic_size, cache_dtype)
        rec = _timed_train(speed_cfg(k, epochs, synthetic_size, cache_dtype,
                                     in_memory=True), tmp / f"rec{k}")
        cached = _timed_train(cfg, tmp / f"cache{k}")
        rows.append({"modules": k, "epochs": epochs, "recompute_s": rec, "cache_s": cached,
                     "cache_over_recompute": cached / rec})
    return rows


class RamSource:
    """The same batches as a `CacheSource`, from the cache's rows held in RAM."""

    def __init__(self, disk):
        self.disk = disk
        r = disk.reader
        self.rows = r.rows(torch.arange(r.count)).to(DTYPES[r.dtype])  # storage dtype, in RAM

    def steps_per_epoch(self) -> int:
        return self.disk.steps_per_epoch()

    def epoch(self, epoch: int = 0, salt: int = 0):
        d = self.disk
        gen = epoch_generator(d.seed, salt, epoch)
        off = (epoch % d.reader.views) * d.reader.n
        for idx in batch_indices(d.reader.n, d.batch_size, True, gen):
            yield self.rows[idx + off].float(), d.labels[idx].long()


def _evict(reader) -> None:
    for s in reader.manifest["shards"]:
        fd = os.open(reader.dir / s["file"], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Evicting:
    """A CacheSource whose shards are evicted from the page cache before every epoch."""

    def __init__(self, disk):
        self.disk = disk

    def steps_per_epoch(self) -> int:
        return self.disk.steps_per_epoch()

    def epoch(self, epoch: int = 0, salt: int = 0):
        _evict(self.disk.reader)
        yield from self.disk.epoch(epoch, salt)


def disk_vs_ram(tmp: Path, k: int, epochs: int, synthetic_size: int, cache_dtype: str,
                repeats: int = 2) -> dict:
    """Throughput (samples/s) of training module k//2 from disk vs RAM (best of `repeats`)."""
    cfg = speed_cfg(k, epochs, synthetic_size, cache_dtype)
    o = OutOfCore(build_run(cfg), tmp / "thr")
    o.start(None)
    m = k // 2
    o.ensure_cache(m, ["train"])
    disk = o.source(m, "train", train=True)
    sources = {"ram": RamSource(disk), "disk_warm": disk, "disk_evicted": _Evicting(disk)}
    best = {name: float("inf") for name in sources}
    for _ in range(repeats):
        for name, src in sources.items():
            stage = o.store.load(m)  # the same initial weights every time
            tr = make_trainer(stage, cfg, m, k, epochs * src.steps_per_epoch())
            t0 = time.perf_counter()
            train_epochs([tr], src, epochs, cfg, salt=m)
            best[name] = min(best[name], time.perf_counter() - t0)
            o.store.release(m)
    n = disk.reader.n * epochs
    out = {f"{name}_samples_per_s": n / s for name, s in best.items()}
    out.update(module=m, modules=k, epochs=epochs, cache_mib=disk.reader.count
               * disk.reader.row_bytes / 2**20,
               disk_warm_over_ram=best["ram"] / best["disk_warm"],
               disk_evicted_over_ram=best["ram"] / best["disk_evicted"])
    return out


def rss_vs_samples(tmp: Path, n_small: int = 256, factor: int = 4) -> dict:
    """Peak RSS of sequential training at N and factor*N samples, in fresh processes."""
    res = {}
    for n in (n_small, n_small * factor):
        cfg = RunConfig(data="synthetic", input_shape=(3, 32, 32), synthetic_size=n,
                        model="resnet20", modules=4, mode="sequential", epochs=1, seed=0,
                        device="cpu", cache_dtype="float16")
        p = subprocess.run([sys.executable, "-c", _RSS_CHILD, json.dumps(cfg.to_dict()),
                            str(tmp / f"rss{n}")], capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"RSS child failed: {p.stderr[-500:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        res[n] = {**r, "training_mib": r["peak_mib"] - r["after_imports_mib"]}
    a, b = res[n_small], res[n_small * factor]
    return {"samples": [n_small, n_small * factor], "runs": {str(k): v for k, v in res.items()},
            "peak_ratio": b["peak_mib"] / a["peak_mib"],
            "training_ratio": b["training_mib"] / a["training_mib"]}


def cache_accuracy(tmp: Path) -> list[dict]:
    """Per-depth test accuracy on digits: cache dtype and views, and the in-memory path."""
    base = dict(data="digits", model="kmresnet", width=16, depth=4, modules=4,
                mode="sequential", epochs=6, seed=0, device="cpu")
    variants = [("in-memory, live augmentation", {"in_memory": True}),
                ("cache float32, A=1", {"cache_dtype": "float32", "cache_views": 1}),
                ("cache float16, A=1", {"cache_dtype": "float16", "cache_views": 1}),
                ("cache float16, A=4", {"cache_dtype": "float16", "cache_views": 4})]
    rows = []
    for i, (name, kw) in enumerate(variants):
        m = train(RunConfig(**base, **kw), tmp / f"acc{i}")
        rows.append({"variant": name, "test_acc": [x["test_acc"] for x in m["modules"]],
                     "best_depth": m["best_depth"], "best_test_acc": m["best_test_acc"]})
    return rows


# the regime jobs of #29: (model, synthetic samples, epochs); K=4, batch 64, 3x32x32
REGIME_JOBS = (("resnet20", 1024, 2), ("resnet56", 512, 4))
MODES = ("e2e", "parallel", "sequential", "multilap")


def _regime_cfg(model: str, k: int, epochs: int, synthetic_size: int, cache_dtype: str,
                mode: str) -> RunConfig:
    return speed_cfg(k, epochs, synthetic_size, cache_dtype, mode=mode, model=model,
                     laps=2 if mode == "multilap" and epochs % 2 == 0 else 1)


def _one_regime(cfg: RunConfig, out: Path) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    m = train(cfg, out)
    return {"total_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "step_s": m["timings"]["step_s"],  # step_s: training steps only
            # the cache pass: trained modules' eval-mode forwards writing the next modules'
            # training caches (val / test caches come from the evaluation's forward)
            "cache_s": m["timings"].get("cache_pass_s", 0.0)}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def regime_wall_clock(tmp: Path, k: int, epochs: int, synthetic_size: int, cache_dtype: str,
                      model: str = "resnet56", rounds: int = 3) -> list[dict]:
    """Wall time of `train` for each regime, same network, data and --epochs (sequential and
    multilap: epochs per module, so every module sees the data as often as in e2e), in
    `rounds` paired rounds (each round runs every regime once, e2e first): per row the
    median over rounds of the whole call's wall time over e2e's in the same round
    (`total_over_e2e`), of its CPU time (`cpu_over_e2e`, less sensitive to other jobs on
    the machine), of its training steps alone (metrics.json's timings.step_s), and of its
    cache pass over e2e's whole call (`cache_over_e2e`: metrics.json's
    timings.cache_pass_s, 0 where no cache is written), so `total_over_e2e -
    cache_over_e2e` is the run's time without the cache pass."""
    runs = {mode: [] for mode in MODES}
    for i in range(rounds):
        for mode in MODES:
            cfg = _regime_cfg(model, k, epochs, synthetic_size, cache_dtype, mode)
            runs[mode].append(_one_regime(cfg, tmp / f"regime-{model}-{mode}-{i}"))
    e2e = runs["e2e"]
    rows = []
    for mode, rs in runs.items():
        ratio = {key: _median([r[key] / e[key] for r, e in zip(rs, e2e) if e[key]])
                 for key in ("total_s", "cpu_s", "step_s")}
        cache = _median([r.get("cache_s", 0.0) / e["total_s"] for r, e in zip(rs, e2e)
                         if e["total_s"]])
        rows.append({"mode": mode, "model": model, "modules": k, "epochs": epochs,
                     "synthetic_size": synthetic_size, "rounds": rounds,
                     "total_s": _median([r["total_s"] for r in rs]),
                     "cpu_s": _median([r["cpu_s"] for r in rs]),
                     "step_s": _median([r["step_s"] for r in rs]),
                     "total_over_e2e": ratio["total_s"], "cpu_over_e2e": ratio["cpu_s"],
                     "step_over_e2e": ratio["step_s"], "cache_over_e2e": cache,
                     "per_round": rs})
    return rows


# the head A/B of `head_wall_clock`: auto's kind before (3x3 conv) and now (1x1 conv)
HEAD_ARMS = ("dgl-s2", "dgl-k1")


def head_wall_clock(tmp: Path, rounds: int = 9, heads=HEAD_ARMS, modes=("parallel", "sequential"),
                    model: str = "resnet20", synthetic_size: int = 1024, epochs: int = 2,
                    cache_dtype: str = "float16") -> list[dict]:
    """train()'s wall time with each of `heads` in each of `modes` on one regime job, in
    `rounds` paired rounds (e2e, then every (mode, head)); per row the median over rounds of
    its wall over e2e's and over the first head's in the same mode and round."""
    arms = [("e2e", None)] + [(m, h) for m in modes for h in heads]
    times: dict = {a: [] for a in arms}
    for i in range(rounds):
        for mode, head in arms:
            cfg = _regime_cfg(model, 4, epochs, synthetic_size, cache_dtype, mode)
            if head is not None:
                cfg = dataclasses.replace(cfg, head=head)
            times[(mode, head)].append(
                _one_regime(cfg, tmp / f"heads-{mode}-{head}-{i}")["total_s"])
    e2e = times[("e2e", None)]
    return [{"mode": mode, "head": head, "model": model, "synthetic_size": synthetic_size,
             "epochs": epochs, "rounds": rounds, "total_s": _median(t),
             "total_over_e2e": _median([a / b for a, b in zip(t, e2e)]),
             "over_first_head": None if head is None else
             _median([a / b for a, b in zip(t, times[(mode, heads[0])])])}
            for (mode, head), t in times.items()]


def heads_table(rows: list[dict]) -> list[str]:
    """The head A/B table (`head_wall_clock`)."""
    r0, first = rows[0], rows[1]["head"]
    lines = [f"Heads in train()'s wall time: {r0['model']} 3x32x32, {r0['synthetic_size']} "
             f"samples, {r0['epochs']} epochs, K=4, {r0['rounds']} paired rounds (e2e, then "
             f"each regime with each head), medians of the per-round ratios.", "",
             f"| regime | head | train() wall s | wall / e2e | wall / {first}'s |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['head'] or '-'} | {r['total_s']:.2f} | "
              f"{r['total_over_e2e']:.3f} | {_fmt3(r['over_first_head'])} |" for r in rows]
    return lines + [""]


def regime_jobs(tmp: Path, k: int, cache_dtype: str, rounds: int,
                jobs=REGIME_JOBS) -> list[dict]:
    """`regime_wall_clock` for every (model, samples, epochs) of `jobs`."""
    return [row for model, n, epochs in jobs
            for row in regime_wall_clock(tmp, k, epochs, n, cache_dtype, model, rounds)]


# --------------------------------------------------------------------------- phase profile
# where a run's CPU time goes: the functions of the product path that make up each phase
PHASES = {
    "training steps: forward (body + head)": ("method/loop.py", "stage_loss"),
    "training steps: backward + optimizer": ("method/loop.py", "optimizer_step"),
    "training: batches (data, cache reads)": ("method/loop.py", "train_epoch"),
    "cache writes (frozen prefix, eval mode)": ("regimes/out_of_core.py", "_write"),
    "cache checksums (sha256)": ("storage/cache.py", "_file_sha256"),
    "per-module / final evaluation": ("method/loop.py", "evaluate_chain"),
    "module files (save, load, fsync)": ("storage/atomic.py", "atomic_write"),
    "train() in all": ("regimes/schedule.py", "train"),
}


def phase_profile(tmp: Path, model: str = "resnet20", k: int = 4, epochs: int = 2,
                  synthetic_size: int = 1024, cache_dtype: str = "float16") -> list[dict]:
    """Per regime, the CPU seconds (cProfile with `time.process_time`) of each of `PHASES`
    (cumulative: a phase includes what it calls; `training: batches` is train_epoch minus
    the two step phases), and the heads' share of a training step (`head_share`)."""
    rows = []
    for mode in MODES:
        cfg = _regime_cfg(model, k, epochs, synthetic_size, cache_dtype, mode)
        prof = cProfile.Profile(time.process_time)
        prof.runcall(train, cfg, tmp / f"profile-{mode}")
        stats = pstats.Stats(prof).stats
        cum = {name: sum(v[3] for (f, _, fn), v in stats.items()
                         if f.endswith(where) and fn == func)
               for name, (where, func) in PHASES.items()}
        steps = cum["training steps: forward (body + head)"] + \
            cum["training steps: backward + optimizer"]
        cum["training: batches (data, cache reads)"] -= steps
        rows.append({"mode": mode, "model": model, "modules": k, "epochs": epochs,
                     "cpu_s": {n: round(v, 3) for n, v in cum.items()},
                     "head_share": head_share(cfg) if mode != "e2e" else None})
    return rows


def head_share(cfg: RunConfig, reps: int = 4) -> float:
    """CPU time of every module's head (forward + backward) over that of the modules'
    bodies, one batch of `cfg`'s shape, in training mode."""
    run = build_run(cfg)
    x = torch.randn(cfg.batch_size, *cfg.input_shape)  # (B, C, H, W)
    y = torch.randint(0, 10, (cfg.batch_size,))
    body = head = 0.0
    for st in run.stages:
        st.train()
        with torch.no_grad():
            z = st.features(x)
        body += _cpu_of(lambda: st.features(x).float().square().mean().backward(), reps)
        zz = z.detach().requires_grad_(True)
        head += _cpu_of(lambda: F.cross_entropy(st.head(zz), y).backward(), reps)
        x = z
    return head / body


# a training step's parts (`step_parts`): (label, mode, RunConfig changes); each row is the
# parallel step with one of TRGL's costs taken away, so the differences attribute the time
STEP_VARIANTS = (
    ("e2e", "e2e", {}),
    ("parallel (TRGL, --head auto)", "parallel", {}),
    ("parallel, dgl-s2 heads (a 3x3 conv; auto's before dgl-k1)", "parallel", {"head": "dgl-s2"}),
    ("parallel, no transport (VanGL)", "parallel", {"transport": False}),
    ("parallel, linear heads", "parallel", {"head": "linear"}),
    ("parallel, VanGL and linear heads", "parallel", {"transport": False, "head": "linear"}),
)


def step_parts(model: str = "resnet20", k: int = 4, reps: int = 25,
               variants=STEP_VARIANTS) -> list[dict]:
    """Where one training step's time goes: `train_step` on one fixed batch (64, 3x32x32,
    as the data reader gives it) for each of `variants`, in `reps` paired repetitions
    (each repetition times every variant once, after 3 warm-up steps each); per row the
    median milliseconds and the median of its ratio to e2e's step in the same repetition."""
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    steps = []
    for label, mode, changes in variants:
        cfg = speed_cfg(k, 1, 256, "float16", mode=mode, model=model, **changes)
        trainers, _ = TRAINERS[mode](build_run(cfg))
        steps.append((label, mode, changes, trainers))
    run = lambda trainers: train_step(trainers, x, y, 0.0, "mean")  # noqa: E731
    for *_, trainers in steps:
        for _ in range(3):
            run(trainers)
    times = [[] for _ in steps]
    for _ in range(reps):
        for t, (*_, trainers) in zip(times, steps):
            t0 = time.perf_counter()
            run(trainers)
            t.append(time.perf_counter() - t0)
    return [{"variant": label, "mode": mode, "changes": changes, "model": model, "modules": k,
             "reps": reps, "step_ms": 1e3 * statistics.median(t),
             "over_e2e": statistics.median(a / b for a, b in zip(t, times[0]))}
            for (label, mode, changes, _), t in zip(steps, times)]


def steps_table(rows: list[dict]) -> list[str]:
    """The step-parts table (`step_parts`)."""
    r0 = rows[0]
    lines = [f"Where a training step's time goes: {r0['model']} 3x32x32, batch 64, K="
             f"{r0['modules']}, one fixed batch, {r0['reps']} paired repetitions of "
             "`train_step` (medians). Each row takes one of TRGL's costs away from the parallel "
             "step, so the differences between rows attribute its time.", "",
             "| step | ms | over e2e |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['step_ms']:.1f} | {r['over_e2e']:.3f} |" for r in rows]
    return lines + [""]


def _cpu_of(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


# what #29 removed from module-wise training's time (the regime table's "before" column is
# the table of 0.2.0, kept in speed.json as `regimes_before` with its own stamp)
REMOVED = [
    "The DGL heads' 3x3 conv runs at stride 2 (`dgl-s2`): each extra head cost 8-24% of its "
    "module's body on resnet20; the strided head is a quarter of the compute, and its "
    "accuracy matched the DGL head's within the 95% confidence interval "
    "(research/head_cost/results/head_cost-dgl-s2.md, 5 seeds).",
    "Then a 1x1 conv in that head (`--head auto` now builds `dgl-k1`): the heads' CPU share "
    "of a resnet20 step halves again, train() takes 0.97x as long as with `dgl-s2` (the head "
    "table), and its accuracy matched `dgl-s2`'s within the 95% confidence interval on "
    "resnet20 and kmresnet (research/head_cost/results/head_cost-dgl-k1-vs-dgl-s2*.md, "
    "5 seeds).",
    "Module k's evaluation on the validation and test sets and the writing of module k+1's "
    "validation and test caches are one eval-mode forward (they were two).",
    "The activation cache's shards and manifest are no longer fsynced: every reader checks a "
    "shard's sha256 and a failing cache is rebuilt, so only a power loss could cost a "
    "rebuild; the fsyncs were a third of the cache write's time.",
    "A cache shard written in this process is not read back to be hashed when it is opened "
    "(the writer's checksum, with the file's stat, is recorded).",
    "The cache and data readers' prefetch thread runs its float16 -> float32 conversion on "
    "one intra-op thread, beside the training step's OpenMP team instead of a second team.",
    "When torch's intra-op threads hold every usable core, batches are read in the training "
    "step's own thread, not by the prefetch thread: beside a full OpenMP team the thread made "
    "sequential and multi-lap train() 1.05-1.07x as long (resnet20 job, medians of 4-5 paired "
    "rounds); with a core free it still reads ahead.",
]


def regimes_table(rows: list[dict], before: list[dict] | None = None) -> list[str]:
    """The regime table: per job and regime, medians over paired rounds (with the
    total_over_e2e of `before`, an earlier table, beside each row when given)."""
    old = {(r.get("model"), r.get("synthetic_size"), r["mode"]): r["total_over_e2e"]
           for r in before or []}
    extra = " 0.2.0 wall / e2e |" if old else ""
    lines = ["Every regime on the same job (3x32x32 synthetic, batch 64, K=4, seed 0) and "
             "--epochs (sequential and multilap: per module; multilap in 2 laps), paired "
             "rounds (each round runs every regime once, e2e first); ratios are the median "
             "over rounds of a run's figure over e2e's in the same round. Wall: the whole "
             "`train()` call; CPU: its process time (less sensitive to other jobs); steps: "
             "metrics.json's timings.step_s; cache pass: the wall time of writing the "
             "training caches (one eval-mode forward of each trained module but the last "
             "over the training split, per lap; metrics.json's timings.cache_pass_s; the "
             "validation and test caches come from each module's evaluation) over e2e's "
             "train() wall.", "",
             "| model | samples | regime | epochs | rounds | train() wall s | wall / e2e "
             "(total_over_e2e) | CPU / e2e | steps / e2e | cache pass / e2e |" + extra,
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if old else "")]
    for r in rows:
        was = old.get((r.get("model"), r.get("synthetic_size"), r["mode"]))
        lines.append(f"| {r.get('model', 'resnet56')} | {r.get('synthetic_size', '')} | "
                     f"{r['mode']} | {r['epochs']} | {r.get('rounds', 1)} | {r['total_s']:.1f} | "
                     f"{r['total_over_e2e']:.3f} | {_fmt3(r.get('cpu_over_e2e'))} | "
                     f"{_fmt3(r.get('step_over_e2e'))} | {_fmt3(r.get('cache_over_e2e'))} |"
                     + (f" {_fmt3(was)} |" if old else ""))
    if old:
        lines += ["", "Removed from module-wise training's time since 0.2.0 (#29):", ""]
        lines += [f"- {item}" for item in REMOVED]
    return lines + [""]


def profile_table(rows: list[dict]) -> list[str]:
    """Where the CPU time of each regime goes (`phase_profile`)."""
    r0 = rows[0]
    names = list(r0["cpu_s"])
    lines = [f"Where the time goes: CPU seconds per phase, {r0['model']} 3x32x32, K="
             f"{r0['modules']}, {r0['epochs']} epochs, one run per regime under cProfile "
             "(process time; a phase includes what it calls). Heads: every module's head "
             "(forward + backward) over the modules' bodies, one batch.", "",
             "| phase | " + " | ".join(r["mode"] for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r['cpu_s'][n]:.2f}" for r in rows) + " |")
    lines.append("| heads / bodies (one batch) | " + " | ".join(
        _fmt3(r["head_share"]) for r in rows) + " |")
    return lines + [""]


def _fmt3(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _table(res: dict) -> str:
    lines = []
    if res.get("regimes"):
        lines += regimes_table(res["regimes"], res.get("regimes_before"))
    if res.get("profile"):
        lines += profile_table(res["profile"])
    if res.get("steps"):
        lines += steps_table(res["steps"])
    if res.get("heads"):
        lines += heads_table(res["heads"])
    lines += ["| K | epochs | recompute s | cache s | cache / recompute |", "|---|---|---|---|---|"]
    for r in res.get("cache_vs_recompute") or []:
        lines.append(f"| {r['modules']} | {r['epochs']} | {r['recompute_s']:.1f} | "
                     f"{r['cache_s']:.1f} | {r['cache_over_recompute']:.3f} |")
    if res.get("disk_vs_ram"):
        d = res["disk_vs_ram"]
        lines += ["", "| source | samples/s | ratio to RAM |", "|---|---|---|",
                  f"| RAM | {d['ram_samples_per_s']:.1f} | 1.000 |",
                  f"| disk (page cache warm) | {d['disk_warm_samples_per_s']:.1f} | "
                  f"{d['disk_warm_over_ram']:.3f} |",
                  f"| disk (evicted every epoch) | {d['disk_evicted_samples_per_s']:.1f} | "
                  f"{d['disk_evicted_over_ram']:.3f} |"]
    if res.get("rss"):
        r = res["rss"]
        lines += ["", "| samples | peak RSS MiB | after imports MiB | training MiB |",
                  "|---|---|---|---|"]
        for n, v in r["runs"].items():
            lines.append(f"| {n} | {v['peak_mib']:.1f} | {v['after_imports_mib']:.1f} | "
                         f"{v['training_mib']:.1f} |")
        lines.append(f"| ratio 4N/N | {r['peak_ratio']:.3f} | | {r['training_ratio']:.3f} |")
    if res.get("accuracy"):
        lines += ["", "| digits, sequential K=4 | test acc per depth | best depth | test acc |",
                  "|---|---|---|---|"]
        for a in res["accuracy"]:
            accs = " ".join(f"{v:.3f}" for v in a["test_acc"])
            lines.append(f"| {a['variant']} | {accs} | {a['best_depth']} | "
                         f"{a['best_test_acc']:.4f} |")
    return "\n".join(lines)


PARTS = ("regimes", "profile", "steps", "heads", "cache_vs_recompute", "disk_vs_ram", "rss",
         "accuracy")


def run_speed(out_dir: Path, ks: list[int] = (4, 8), epochs: int = 3, synthetic_size: int = 512,
              cache_dtype: str = "float16", accuracy: bool = True, rss: bool = True,
              parts: tuple[str, ...] = PARTS, rounds: int = 3) -> dict:
    """Run the speed benchmark; write speed.json and speed.md to `out_dir`; return results.

    Args:
        out_dir: results directory (created).
        ks: module counts for the cache-vs-recompute comparison.
        epochs: epochs per module.
        synthetic_size: training samples of the synthetic data set.
        cache_dtype: storage dtype of the cache.
        accuracy: also run the digits accuracy comparison (4 short runs).
        rss: also run the RSS-vs-samples comparison (2 fresh processes).
        parts: which parts to run (of PARTS); the others keep the figures of an earlier run
            in `out_dir`/speed.json, each part stamped with when and under what load it ran.
        rounds: paired rounds of the regime table (`regime_jobs`: REGIME_JOBS at K=max(ks)).
    """
    out_dir = Path(out_dir)
    old = out_dir / "speed.json"
    res = json.loads(old.read_text()) if old.is_file() else {}
    res.update({"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "cache_dtype": cache_dtype, "synthetic_size": synthetic_size})
    jobs = {"regimes": lambda t: regime_jobs(t, 4, cache_dtype, rounds),
            "profile": lambda t: phase_profile(t, cache_dtype=cache_dtype),
            "steps": lambda t: step_parts(),
            "heads": lambda t: head_wall_clock(t, rounds),
            "cache_vs_recompute": lambda t: cache_vs_recompute(t, list(ks), epochs,
                                                               synthetic_size, cache_dtype),
            "disk_vs_ram": lambda t: disk_vs_ram(t, max(ks), 1, synthetic_size, cache_dtype),
            "rss": lambda t: rss_vs_samples(t) if rss else None,
            "accuracy": lambda t: cache_accuracy(t) if accuracy else None}
    with tempfile.TemporaryDirectory(prefix="edgetrain-speed-") as d:
        for name in [p for p in PARTS if p in parts]:  # results are written after every part
            load = os.getloadavg()[0]
            res[name] = jobs[name](Path(d))
            res.setdefault("measured", {})[name] = {
                "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_before": load,
                "load_after": os.getloadavg()[0]}
            _write(out_dir, res)
    return res


# what became of each candidate of `bench/speedups.py` (the figures come from its results)
DECISIONS = {
    "channels_last": "kept on AVX-512 CPUs (#29: edgetrain.method.precision.memory_format); "
                     "not on oneDNN's AVX2 kernels, whose weight gradient of a channels-last "
                     "1x1 stride-2 conv corrupts the heap (torch 2.14.1; "
                     "benchmarks/channels_last_repro_torch.py)",
    "sgd foreach": "rejected: no win beyond the rounds' spread",
    "sgd fused": "rejected: slower",
    "torch.compile": "opt-in (`--compile`): the cold compile outweighs the faster steps here, "
                     "and on a long run a compiled epoch took 1.05-1.10x an eager one "
                     "(benchmarks/results/compile.md)",
    "threads=1": "(threads) kept: the CLI uses the CPUs the process may use (measure.usable_cores)",
}


def speedups_section(out_dir: Path) -> str:
    """speedups*.json in `out_dir` as tables with the decision taken on each candidate."""
    lines = []
    for path in sorted(Path(out_dir).glob("speedups*.json")):
        r = json.loads(path.read_text())
        shape = "x".join(map(str, r["input_shape"]))
        lines += [f"\n## Step-time candidates: {r['model']} {shape} batch {r['batch']}, module "
                  f"{r['module']} of K={r['modules']} ({path.name}; {r['rounds']} paired rounds, "
                  f"load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f})\n",
                  "| variant | ratio to today's step (median) | decision |", "|---|---:|---|"]
        for row in r["rows"][1:]:
            extra = (f"; with the {row['compile_s']:.0f} s cold compile over {row['job_steps']} "
                     f"steps: {row['ratio_with_compile']:.3f}" if "compile_s" in row else "")
            decision = DECISIONS.get(row["variant"], "threads: oversubscribed" if
                                     row["variant"].startswith("threads=") else "")
            lines.append(f"| {row['variant']} | {row['ratio']:.3f}{extra} | {decision} |")
        lines.append(f"| inference_mode for frozen passes | "
                     f"{r['prefix_inference_over_no_grad']:.3f} | rejected: within the noise |")
    return "\n".join(lines)


def _write(out_dir: Path, res: dict) -> None:
    res["table_md"] = _table(res)
    write_result_json(out_dir / "speed.json", res)
    when = "; ".join(f"{k}: {v['utc']} UTC, load {v['load_before']:.2f} -> {v['load_after']:.2f}"
                     for k, v in res.get("measured", {}).items())
    atomic_write_text(out_dir / "speed.md", "# edgetrain bench speed\n\n"
                      + (f"Parts measured: {when}.\n\n" if when else "") + res["table_md"] + "\n"
                      + speedups_section(out_dir) + "\n")
