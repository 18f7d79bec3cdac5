"""Benchmark: candidate speed-ups of a module's CPU training step, each as a ratio to today's.

One process, one module: module 1 of a K-module network (default resnet56 on 3x32x32,
batch 64, K=4: the module with the largest feature maps), trained with `train_step` (the
step of every module-wise regime) on fixed random batches held in RAM, so only the step is
timed. In every round each variant times `steps` steps after `warmup` steps, the variants in
an order rotated each round; the ratio is variant / baseline of the same round, and the
table gives the median over rounds. Variants:

- `channels_last`: the module's weights and its input batches in channels-last memory format
  (the baseline keeps both contiguous, NCHW: the format before channels-last was adopted);
- `sgd foreach` / `sgd fused`: the optimizer's multi-tensor or fused step;
- `torch.compile`: the module's forward and loss compiled (inductor; needs a C++ compiler);
  the compile time is measured separately and charged to a job of `job_steps` steps;
- `threads=N`: intra-op threads other than torch's default (`torch.get_num_threads()`);
- frozen-prefix forwards (the cache writer's and `PrefixSource`'s pass over modules 1..K-1):
  `torch.inference_mode()` against today's `torch.no_grad()`.

This file does not parse argv (see `research/speedups/run.py`).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from edgetrain import __version__
from edgetrain.bench.results import write_json_and_markdown
from edgetrain.config import RunConfig
from edgetrain.method.loop import make_trainer, stage_loss, train_step
from edgetrain.regimes.run import build_run


def _config(model: str, input_shape: tuple, batch: int, modules: int) -> RunConfig:
    return RunConfig(data="synthetic", input_shape=input_shape, synthetic_size=max(2 * batch, 200),
                     model=model, modules=modules, mode="sequential", batch_size=batch,
                     seed=0, device="cpu", augment=False)


def _batches(run, batch: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    c, h, w = run.data.input_shape
    return [(torch.randn(batch, c, h, w, generator=g),
             torch.randint(0, run.data.num_classes, (batch,), generator=g)) for _ in range(n)]


class StepVariant:
    """A fresh copy of module `k` (same initial weights) trained under one variant."""

    def __init__(self, name: str, cfg: RunConfig, k: int, opt_kw: dict | None = None,
                 channels_last: bool = False, compiled: bool = False, threads: int | None = None):
        self.name, self.cfg, self.k = name, cfg, k
        self.opt_kw, self.channels_last, self.compiled, self.threads = (
            opt_kw or {}, channels_last, compiled, threads)
        self.compile_s = None

    def build(self):
        run = build_run(self.cfg)  # same seed: the same initial weights for every variant
        prefix, stage = run.stages[:self.k], run.stages[self.k]
        tr = make_trainer(stage, self.cfg, self.k, len(run.stages), total_steps=10**6)
        if self.opt_kw:
            p = [q for g in tr.opt.param_groups for q in g["params"]]
            tr.opt = torch.optim.SGD(p, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                     weight_decay=self.cfg.weight_decay, **self.opt_kw)
        # build_run makes CPU modules channels-last (the kept candidate): the baseline is the
        # contiguous (NCHW) format this benchmark measured it against
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for st in run.stages:
            st.to(memory_format=fmt)
        return run, prefix, tr

    def inputs(self, run, prefix, batches):
        out = []
        with torch.no_grad():
            for x, y in batches:
                for st in prefix:
                    st.eval()
                    x = st.features(x)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out.append((x, y))
        return out

    def time_steps(self, run, prefix, tr, batches, warmup: int, steps: int) -> float:
        """Median seconds per step over `steps` steps after `warmup`."""
        xs = self.inputs(run, prefix, batches)
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            step = train_step
            if self.compiled:
                step = self._compiled_step(tr)
                t0 = time.perf_counter()
                step([tr], *xs[0], 0.0, "mean")  # the first call compiles
                self.compile_s = time.perf_counter() - t0
            times = []
            for i in range(warmup + steps):
                x, y = xs[i % len(xs)]
                t0 = time.perf_counter()
                step([tr], x, y, 0.0, "mean")
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            return statistics.median(times)
        finally:
            torch.set_num_threads(before)

    @staticmethod
    def _compiled_step(tr):
        fwd = torch.compile(lambda x, y: stage_loss(tr, x, y, 0.0, "mean"))

        def step(trainers, x, y, label_smoothing, scaling):
            tr.stage.train()
            tr.set_lr()
            total, ce, w, logits, z = fwd(x, y)
            tr.opt.zero_grad(set_to_none=True)
            total.backward()
            tr.opt.step()
            tr.weighting.after_step()
            tr.step += 1
            return [{"loss": float(ce.detach())}]
        return step


def prefix_forward_s(run, batches, mode: str, rounds: int) -> float:
    """Median seconds of one pass of frozen modules 1..K-1 over `batches`."""
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    for st in run.stages:
        st.eval()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with ctx():
            for x, _ in batches:
                for st in run.stages[:-1]:
                    x = st.features(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compiler_available() -> bool:
    """Inductor's CPU backend compiles C++: is there a compiler (CXX, c++, g++, clang++)?"""
    import shutil  # only for this probe
    return any(shutil.which(c) for c in filter(None, [os.environ.get("CXX"), "c++", "g++",
                                                       "clang++"]))


def run_speedups(out_dir, model: str = "resnet56", input_shape=(3, 32, 32), batch: int = 64,
                 modules: int = 4, module: int = 0, rounds: int = 3, warmup: int = 3,
                 steps: int = 15, job_steps: int = 200, compile_: bool = True,
                 stem: str = "speedups") -> dict:
    load_before = os.getloadavg()
    cfg = _config(model, tuple(input_shape), batch, modules)
    default_threads = torch.get_num_threads()
    variants = [StepVariant("baseline", cfg, module),
                StepVariant("channels_last", cfg, module, channels_last=True),
                StepVariant("sgd foreach", cfg, module, opt_kw={"foreach": True}),
                StepVariant("sgd fused", cfg, module, opt_kw={"fused": True}),
                StepVariant(f"threads={2 * default_threads}", cfg, module,
                            threads=2 * default_threads)]
    if default_threads > 1:
        variants.append(StepVariant("threads=1", cfg, module, threads=1))
    can_compile = compile_ and compiler_available()
    if can_compile:
        variants.append(StepVariant("torch.compile", cfg, module, compiled=True))
    per_round: list[dict[str, float]] = []
    compile_s = []
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        times = {}
        for v in order:
            run, prefix, tr = v.build()
            batches = _batches(run, batch, 4)
            times[v.name] = v.time_steps(run, prefix, tr, batches, warmup, steps)
            if v.compile_s is not None:
                compile_s.append(v.compile_s)
            print(f"round {r} {v.name}: {times[v.name] * 1e3:.1f} ms/step", flush=True)
        per_round.append(times)
    rows = []
    for v in variants:
        ratios = [t[v.name] / t["baseline"] for t in per_round]
        row = {"variant": v.name, "step_ms": 1e3 * statistics.median(t[v.name] for t in per_round),
               "ratio": statistics.median(ratios), "ratios": ratios}
        if v.compiled and compile_s:
            c = compile_s[0]  # the first compile is cold; later rounds hit inductor's caches
            base = statistics.median(t["baseline"] for t in per_round)
            row.update(compile_s=c, compile_s_each=compile_s, job_steps=job_steps,
                       ratio_with_compile=(c + job_steps * row["step_ms"] / 1e3)
                       / (job_steps * base))
        rows.append(row)
    run = build_run(cfg)
    for st in run.stages:
        st.to(memory_format=torch.contiguous_format)
    batches = _batches(run, batch, 4)
    prefix = {}
    for mode in ("no_grad", "inference_mode", "no_grad", "inference_mode"):
        prefix.setdefault(mode, []).append(prefix_forward_s(run, batches, mode, 3))
    pf = {m: statistics.median(v) for m, v in prefix.items()}
    res = {"edgetrain": __version__, "torch": torch.__version__, "machine": platform.machine(),
           "cpus": os.cpu_count(), "load_before": load_before, "default_threads": default_threads,
           "model": model, "input_shape": list(input_shape), "batch": batch, "modules": modules,
           "module": module + 1, "rounds": rounds, "warmup": warmup, "steps": steps,
           "compiler": compiler_available(), "rows": rows,
           "prefix_forward_s": pf,
           "prefix_inference_over_no_grad": pf["inference_mode"] / pf["no_grad"],
           "load_after": os.getloadavg()}
    return write_json_and_markdown(res, out_dir, stem, markdown)


def markdown(res: dict) -> str:
    lines = ["# Candidate speed-ups of a module's CPU training step\n",
             f"edgetrain {res['edgetrain']}, torch {res['torch']}, {res['machine']}, "
             f"{res['cpus']} CPUs, torch's default {res['default_threads']} threads; load average "
             f"before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}. {res['model']} {'x'.join(map(str, res['input_shape']))}"
             f" batch {res['batch']}, module {res['module']} of K={res['modules']}, train_step on "
             f"batches in RAM; {res['rounds']} rounds of {res['steps']} timed steps after "
             f"{res['warmup']} warm-up steps; ratio = variant / baseline in the same round "
             "(median over rounds; < 1 is faster).\n",
             "| variant | ms per step | ratio to baseline | per-round ratios |",
             "|---|---:|---:|---|"]
    for r in res["rows"]:
        each = ", ".join(f"{v:.3f}" for v in r["ratios"])
        lines.append(f"| {r['variant']} | {r['step_ms']:.1f} | {r['ratio']:.3f} | {each} |")
    for r in res["rows"]:
        if "compile_s" in r:
            lines.append(f"\ntorch.compile: the first (cold) compile took {r['compile_s']:.1f} s "
                         "(later rounds, with inductor's caches warm: "
                         f"{', '.join(f'{v:.1f}' for v in r['compile_s_each'][1:])} s); charged to a "
                         f"job of {r['job_steps']} steps of this module the ratio is "
                         f"{r['ratio_with_compile']:.3f}.")
    if not res["compiler"]:
        lines.append("\ntorch.compile: no C++ compiler found, not measured.")
    pf = res["prefix_forward_s"]
    lines.append(f"\nFrozen-prefix forward (modules 1..K-1 over 4 batches): no_grad "
                 f"{pf['no_grad']:.3f} s, inference_mode {pf['inference_mode']:.3f} s, ratio "
                 f"{res['prefix_inference_over_no_grad']:.3f}.\n")
    return "\n".join(lines)
