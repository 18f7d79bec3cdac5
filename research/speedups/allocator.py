"""Benchmark: the CLI's allocator policy (EDGETRAIN_MALLOC) per job: wall time, CPU time, peak RSS.

Each job is a whole `edgetrain train` command run in a fresh process, once per policy and
round; the policies of a round run one after the other in an order rotated each round, so a
slow spell of the machine does not always hit the same policy. Time and peak RSS come from
the child's own resource usage (`os.wait4`: ru_utime, ru_stime, ru_maxrss), the wall time
from the parent's monotonic clock around the child. Every ratio is against `system` (glibc's
untouched default) in the same round; the table reports the median over rounds.

This file does not parse argv (see `research/speedups/run_allocator.py`).
"""
from __future__ import annotations

import os
from pathlib import Path
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from edgetrain import __version__
from edgetrain.bench.results import write_json_and_markdown
from edgetrain.measure import MALLOC_DEFAULT, resolve_malloc_policy

# the default job (docs/quickstart.md), `bench speed`'s sequential jobs, and a job with
# large feature maps (the retention example of docs/memory.md, "The allocator")
JOBS = {
    "default": [],
    "speed-resnet56-K4": ["--data", "synthetic", "--input", "3x32x32", "--synthetic-size", "512",
                          "--model", "resnet56", "-K", "4", "--mode", "sequential",
                          "--epochs", "3", "--batch-size", "64"],
    "resnet110-96px-parallel-K4": ["--data", "synthetic", "--input", "3x96x96",
                                   "--synthetic-size", "128", "--model", "resnet110", "-K", "4",
                                   "--mode", "parallel", "--split", "memory", "--epochs", "1",
                                   "--batch-size", "32", "--no-augment"],
}
# the same job under a memory budget: EDGETRAIN_MALLOC=auto picks compact there
JOBS["resnet110-96px-parallel-K4-budget"] = [*JOBS["resnet110-96px-parallel-K4"],
                                             "--memory-budget", "4GiB"]
POLICIES = ["system", "compact", "mmap:4", "mmap:16"]


def run_job(args: list[str], policy: str, out: Path, threads: int | None) -> dict:
    """One `edgetrain train` in a fresh process under `policy`: wall/user/system seconds and
    peak RSS (MiB)."""
    env = {**os.environ, "EDGETRAIN_MALLOC": policy}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "edgetrain.cli", "train", *args, "--no-progress",
           "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{policy}: {' '.join(cmd)} exited {proc.returncode}: {err[-400:]}")
    return {"policy": policy, "wall_s": wall, "user_s": usage.ru_utime,
            "system_s": usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def summarise(runs: list[dict], policies: list[str]) -> list[dict]:
    """Per policy: medians over rounds, and the median of the per-round ratios to `system`."""
    rows = []
    by_round: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["policy"]] = r
    for p in policies:
        mine = [r for r in runs if r["policy"] == p]
        ratios = [rd[p]["wall_s"] / rd["system"]["wall_s"] for rd in by_round.values()
                  if p in rd and "system" in rd]
        rss = [rd[p]["peak_rss_mib"] / rd["system"]["peak_rss_mib"] for rd in by_round.values()
               if p in rd and "system" in rd]
        rows.append({
            "policy": p, "rounds": len(mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine),
            "user_s": statistics.median(r["user_s"] for r in mine),
            "system_s": statistics.median(r["system_s"] for r in mine),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
            "wall_vs_system": statistics.median(ratios) if ratios else None,
            "wall_vs_system_each": ratios,
            "rss_vs_system": statistics.median(rss) if rss else None})
    return rows


def run_allocator(out_dir: Path, jobs: dict[str, int], policies: list[str] = POLICIES,
                  threads: int | None = None, stem: str = "allocator") -> dict:
    """`jobs`: job name (a key of JOBS) -> rounds. Writes `stem`.json/.md in `out_dir`."""
    for p in policies:
        resolve_malloc_policy(p, False)  # a bad policy fails before any run
    if "system" not in policies:
        raise ValueError("the policies must include 'system' (the baseline of every ratio)")
    result = {"edgetrain": __version__, "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_before": os.getloadavg(), "threads": threads, "default": MALLOC_DEFAULT,
              "policies": policies, "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="edgetrain-alloc-") as tmp:
        for job, rounds in jobs.items():
            runs = []
            for rnd in range(rounds):
                order = policies[rnd % len(policies):] + policies[:rnd % len(policies)]
                for p in order:
                    out = Path(tmp) / f"{job}-{rnd}-{p.replace(':', '')}"
                    r = run_job(JOBS[job], p, out, threads)
                    runs.append({**r, "round": rnd})
                    print(f"{job} round {rnd} {p}: {r['wall_s']:.1f} s, "
                          f"{r['peak_rss_mib']:.0f} MiB", flush=True)
            result["jobs"][job] = {"args": JOBS[job], "runs": runs,
                                   "rows": summarise(runs, policies)}
    result["load_after"] = os.getloadavg()
    return write_json_and_markdown(result, out_dir, stem, markdown)


def markdown(res: dict) -> str:
    lines = ["# Allocator policy per job (EDGETRAIN_MALLOC)\n",
             f"edgetrain {res['edgetrain']}, {res['machine']}, {res['cpus']} CPUs; load average "
             f"before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}. Each row: "
             "a whole `edgetrain train` in a fresh process; medians over rounds; ratios are "
             "per round against `system` (glibc's untouched default), then the median. "
             f"The CLI's default policy when this ran: `{res['default']}`.\n"]
    for job, j in res["jobs"].items():
        lines += [f"## {job}\n", f"`edgetrain train {' '.join(j['args'])}`\n",
                  "| policy | rounds | wall s | user s | system s | peak RSS MiB | wall / system "
                  "| peak RSS / system | per-round wall ratios |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in j["rows"]:
            each = ", ".join(f"{v:.3f}" for v in r["wall_vs_system_each"])
            lines.append(f"| {r['policy']} | {r['rounds']} | {r['wall_s']:.1f} | {r['user_s']:.1f} "
                         f"| {r['system_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                         f"{r['wall_vs_system']:.3f} | {r['rss_vs_system']:.3f} | {each} |")
        lines.append("")
    return "\n".join(lines)
