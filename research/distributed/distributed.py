"""Scaling benchmark of distributed parallel training: images/s of 1 process vs P processes.

Every arm trains the same `edgetrain train --mode parallel` configuration in fresh
processes: "1 process" is the single-process parallel regime (`edgetrain train`),
"P processes, B=b" is `torchrun --nproc_per_node P ... --distributed --buffer-size b` over
loopback with gloo. Each process runs one torch thread (`torch.set_num_threads(1)` for the
single process, OMP_NUM_THREADS=1 for torchrun's workers, checked from metrics.json), so P
processes use P cores. Throughput is training images / training seconds as written in
metrics.json (the distributed figure runs from a barrier to the last rank's last step);
start-up and evaluation are not counted (nor the one-off import of torch._dynamo that
the first optimiser triggers, which the single process would otherwise count). The arms are interleaved within each repeat and
ratios are taken against the 1-process figure of the same repeat, because the machine is
shared and absolute speeds drift.

This file does not parse argv or read the environment: the caller passes `env`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
import json
import os
from pathlib import Path
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from edgetrain.errors import UserError
from edgetrain.storage.atomic import atomic_write_text
from edgetrain.bench.results import write_result_json

DEFAULT_TRAIN_ARGS = ["--data", "synthetic", "--input", "3x32x32", "--synthetic-size", "1024",
                      "--model", "kmresnet", "--width", "32", "--depth", "4", "--modules", "4",
                      "--epochs", "2", "--batch-size", "64", "--seed", "0"]


@dataclass
class ScalingSetup:
    """What to measure: the run's `edgetrain train` options, process counts, buffer sizes."""

    train_args: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN_ARGS))
    nprocs: list[int] = field(default_factory=lambda: [2])
    buffer_sizes: list[int] = field(default_factory=lambda: [0, 4])
    repeats: int = 3
    timeout_s: float = 900.0

    def arms(self) -> list[dict]:
        out = [{"name": "1 process", "nproc": 1, "buffer_size": None}]
        for p in self.nprocs:
            out += [{"name": f"{p} processes, B={b}", "nproc": p, "buffer_size": b}
                    for b in self.buffer_sizes]
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arm_command(arm: dict, train_args: list[str], out: Path) -> list[str]:
    """The command line of one arm (single process: one torch thread set in-process)."""
    args = ["train", *train_args, "--mode", "parallel", "--no-progress", "--out", str(out)]
    if arm["buffer_size"] is None:
        # torch._dynamo is imported by the first optimiser's constructor (seconds): inside
        # schedule.train's timed region, outside the distributed one; import it up front.
        code = ("import sys, torch, torch._dynamo; torch.set_num_threads(1); "
                "from edgetrain.cli import main; main(sys.argv[1:])")
        return [sys.executable, "-c", code, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(arm["nproc"]),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "edgetrain.cli", *args, "--distributed", "--buffer-size", str(arm["buffer_size"])]


def train_images(run_dir: Path, env: dict) -> int:
    """Images seen in training: epochs x training-split size, from the run's config.

    Read in a fresh process, whose RunConfig is the one that wrote the run (the tree may
    change while a long benchmark runs)."""
    code = ("import sys; from pathlib import Path; from edgetrain.config import RunConfig; "
            "from edgetrain.regimes.run import load_data; "
            "c = RunConfig.load(Path(sys.argv[1]) / 'config.json'); "
            "print(c.epochs * len(load_data(c).train))")
    p = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                       env=env, timeout=600)
    if p.returncode != 0:
        raise UserError(f"cannot read {run_dir}/config.json: {p.stderr.strip().splitlines()[-1:]}")
    return int(p.stdout.split()[-1])


def run_arm(arm: dict, train_args: list[str], work: Path, env: dict, timeout_s: float) -> dict:
    """Train one arm in fresh processes; returns its training seconds and images/s."""
    out = work / f"run-{time.monotonic_ns()}"
    p = subprocess.run(arm_command(arm, train_args, out), capture_output=True, text=True,
                       env=env, timeout=timeout_s)
    if p.returncode != 0:
        raise UserError(f"{arm['name']} failed: {(p.stderr.strip() or p.stdout).splitlines()[-1]}")
    m = json.loads((out / "metrics.json").read_text())
    threads = m.get("distributed", {}).get("num_threads", [1])
    if any(t != 1 for t in threads):
        raise UserError(f"{arm['name']} ran with {threads} torch threads, not 1 per process")
    images = train_images(out, env)
    return {"arm": arm["name"], "train_s": m["timings"]["train_s"],
            "images_per_s": images / m["timings"]["train_s"], "train_images": images,
            "per_rank_train_s": m["timings"].get("per_rank_train_s"),
            "rank_modules": m.get("distributed", {}).get("rank_modules"),
            "best_test_acc": m["best_test_acc"]}


def summarize(rows: list[dict], arms: list[dict]) -> list[dict]:
    """Per arm: median images/s and the median of per-repeat ratios to 1 process."""
    base = {r["repeat"]: r["images_per_s"] for r in rows if r["arm"] == arms[0]["name"]}
    out = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm["name"]]
        ratios = [r["images_per_s"] / base[r["repeat"]] for r in mine]
        out.append({"arm": arm["name"], "nproc": arm["nproc"], "buffer_size": arm["buffer_size"],
                    "median_images_per_s": statistics.median(r["images_per_s"] for r in mine),
                    "ratio_to_1_process_per_repeat": ratios,
                    "median_ratio_to_1_process": statistics.median(ratios)})
    return out


def markdown_table(summary: list[dict], meta: dict) -> str:
    lines = ["| arm | median images/s | ratio to 1 process (median over repeats) | per repeat |",
             "|---|---:|---:|---|"]
    for s in summary:
        per = ", ".join(f"{r:.2f}" for r in s["ratio_to_1_process_per_repeat"])
        lines.append(f"| {s['arm']} | {s['median_images_per_s']:.1f} | "
                     f"{s['median_ratio_to_1_process']:.2f} | {per} |")
    cmd = " ".join(meta["train_args"])
    return (f"# Distributed parallel training: images/s, 1 process vs P processes\n\n"
            f"`edgetrain train --mode parallel {cmd}`; one torch thread per process; gloo over "
            f"loopback; {meta['repeats']} repeats, arms interleaved; machine: {meta['cpu_count']} "
            f"cores shared with other jobs (load average {meta['loadavg_start']} at the start, "
            f"{meta['loadavg_end']} at the end).\n\n" + "\n".join(lines) + "\n")


def _write_partial(out_dir: Path, meta: dict, setup: ScalingSetup, rows: list[dict]) -> None:
    """The runs so far, so that an interrupted benchmark keeps what it measured."""
    write_result_json(out_dir / "distributed-scaling.partial.json",
                      {"meta": meta, "setup": asdict(setup), "runs": rows})


def run_benchmark(setup: ScalingSetup, out_dir: Path, env: dict,
                  log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure every arm `setup.repeats` times; write distributed-scaling.{json,md}.

    Args:
        setup: configuration, process counts, buffer sizes and repeats.
        out_dir: where the results go (research/distributed/results/).
        env: environment of the launched processes (the caller sets OMP_NUM_THREADS=1 and,
            for loopback, GLOO_SOCKET_IFNAME).
        log: progress lines.

    Returns:
        The results written to JSON, with `paths` of the written files.
    """
    arms, rows = setup.arms(), []
    meta = {"train_args": setup.train_args, "repeats": setup.repeats, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="edgetrain-dist-bench-") as work:
        for rep in range(setup.repeats):
            for arm in arms:
                row = {"repeat": rep, **run_arm(arm, setup.train_args, Path(work), env, setup.timeout_s)}
                log(f"repeat {rep + 1}/{setup.repeats} {arm['name']}: "
                    f"{row['images_per_s']:.1f} images/s ({row['train_s']:.2f} s)")
                rows.append(row)
                _write_partial(out_dir, meta, setup, rows)
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {"meta": meta, "setup": asdict(setup), "runs": rows, "summary": summarize(rows, arms)}
    write_result_json(out_dir / "distributed-scaling.json", result)
    atomic_write_text(out_dir / "distributed-scaling.md", markdown_table(result["summary"], meta))
    (out_dir / "distributed-scaling.partial.json").unlink(missing_ok=True)
    result["paths"] = [str(out_dir / "distributed-scaling.json"), str(out_dir / "distributed-scaling.md")]
    return result
