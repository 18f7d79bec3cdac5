"""`edgetrain bench cap`: the same training job end-to-end and with edgetrain under one OS limit.

The limit is `RLIMIT_AS` (virtual address space), set with `resource.setrlimit` in each child
before it imports torch (`edgetrain.bench.memory.child_main`), so a cap is an absolute figure
that includes the runtime's own address space (a CPU build of torch maps several hundred MiB,
a CUDA build ~3.2 GiB; the cap sits above that). A child that hits the cap fails with an
allocation error and is reported as failed. Each child runs `edgetrain.train` on
synthetic data in a fresh process.

Jobs: end-to-end (`e2e`), end-to-end with `torch.utils.checkpoint` over S segments of blocks
(`e2e_ckpt`, `--recompute segments:S`: the alternative a PyTorch user would pick; skipped with
S = 0) and edgetrain (`edgetrain`: sequential or multilap, with its own `--recompute` and
`--split`).

Steps: every job uncapped (its peak address space and peak RSS); for edgetrain and e2e_ckpt,
a cap at which the job completes (its uncapped peak plus headroom, grown until a run completes:
the address-space peak varies between runs), then one bisection below it down to `tol_mib` for
the smallest such cap (every probe logged and kept); then e2e and e2e_ckpt at edgetrain's
smallest cap. Fractions of end-to-end's peak are reported above the runtime's own baseline
(address space after imports), and also for RSS from the uncapped runs. A tiny extra job gives
the warm runtime (imports plus what any first training step maps: creating a torch optimizer
imports torch._dynamo and triton, ~180 MiB of shared library and ~90 MiB of heap on the CPU
build): the fractions above that baseline are reported next to the import-based ones.

This file does not parse argv (`edgetrain bench cap` and `benchmarks/cap.py` do).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import tempfile
import time
from typing import Callable

from edgetrain import __version__
from edgetrain.bench.memory import bench_config, run_child
from edgetrain.bench.results import write_json_and_markdown
from edgetrain.errors import UserError
from edgetrain.units import MIB

JOB_NAMES = {"e2e": "e2e", "e2e_ckpt": "e2e+ckpt", "edgetrain": "edgetrain"}


def _mib(v) -> float | None:
    return None if v is None else round(v / MIB, 2)


class _Runner:
    """Runs the children of one benchmark in a scratch directory, numbering run directories."""

    def __init__(self, tmp: str, threads: int, timeout_s: float, log):
        self.tmp, self.threads, self.timeout_s, self.log, self.i = tmp, threads, timeout_s, log, 0

    def __call__(self, cfg, cap: int | None, what: str) -> dict:
        self.i += 1
        spec = {"cfg": cfg.to_dict() | {"cache_dir": f"{self.tmp}/cache{self.i}"},
                "out_dir": f"{self.tmp}/run{self.i}", "threads": self.threads,
                "rlimit_as_bytes": cap}
        res = run_child(spec, self.timeout_s)
        cap_s = "no cap" if cap is None else f"cap {cap / MIB:.0f} MiB"
        self.log(f"{what:<18} {cap_s:<16} {'completed' if res.get('ok') else 'FAILED'} "
                 f"in {res.get('child_wall_s', 0):.0f} s"
                 f"{'' if res.get('ok') else ': ' + str(res.get('error'))[:120]}")
        return res


@dataclass
class _Search:
    """One job's smallest completing cap: the cap a run was verified at, the smallest cap a run
    completed at (and that run), the probes, and the largest cap a probe failed at (the lower
    bracket when none failed)."""
    verified: int
    min_cap: int
    run_at_min: dict
    probes: list
    max_failed: int


def _verified_hi(run: _Runner, cfg, what: str, base: int, peak: int) -> tuple[int, dict]:
    """A cap at which `cfg` completes: its uncapped peak plus headroom, grown until it does
    (the address-space peak varies by tens of MiB between runs: thread arenas, mmaps)."""
    hi = peak + 64 * MIB
    for _ in range(4):
        res = run(cfg, hi, what)
        if res.get("ok"):
            return hi, res
        hi += max(128 * MIB, (hi - base) // 4)
    raise RuntimeError(f"{what} did not complete even at a cap of {hi / MIB:.0f} MiB")


def _bisect(run: _Runner, cfg, what: str, lo: int, hi: int, hi_res: dict, tol: int,
            max_probes: int) -> tuple[int, dict, list, int]:
    """Smallest cap in (lo, hi] at which `cfg` completed, the run that completed there, the
    probes, and the largest cap at which it failed (`lo` if no probe failed)."""
    probes = []
    while hi - lo > tol and len(probes) < max_probes:
        mid = (lo + hi) // 2
        res = run(cfg, mid, f"{what} probe {len(probes) + 1}")
        probes.append({"cap_mib": _mib(mid), "completed": bool(res.get("ok")),
                       "peak_address_space_mib": _mib(res.get("peak_address_space_bytes")),
                       "wall_s": round(res.get("child_wall_s", 0), 1),
                       "error": None if res.get("ok") else str(res.get("error"))[:200]})
        if res.get("ok"):
            hi, hi_res = mid, res
        else:
            lo = mid
    return hi, hi_res, probes, lo


def _smallest_cap(run: _Runner, cfg, what: str, base: int, peak: int, tol: int,
                  max_probes: int) -> _Search:
    """The smallest cap `cfg` completes at: bracketed by the runtime's address space after
    imports (`base`) and a verified cap just above its uncapped `peak`, then bisected."""
    hi, hi_res = _verified_hi(run, cfg, what, base, peak)
    min_cap, min_res, probes, max_failed = _bisect(run, cfg, what, base, hi, hi_res, tol,
                                                   max_probes)
    return _Search(hi, min_cap, min_res, probes, max_failed)


def _jobs(model, input_shape, batch, modules, mode, width, depth, steps, recompute, split,
          ckpt_segments) -> dict:
    """The RunConfig of every job by name (every check runs here, before any child)."""
    job = (model, input_shape, batch)
    jobs = {"e2e": bench_config(*job, "e2e", 1, False, steps, "cpu", width, depth)}
    if ckpt_segments:
        jobs["e2e_ckpt"] = bench_config(*job, "e2e", 1, False, steps, "cpu", width, depth,
                                        recompute=f"segments:{ckpt_segments}")
    jobs["edgetrain"] = bench_config(*job, mode, modules, True, steps, "cpu", width, depth,
                                     recompute=recompute, split=split)
    return jobs


def _ckpt_segments(model, input_shape, width, depth, modules: int, requested: int | None) -> int:
    """S of the e2e+ckpt job: `requested` (default: edgetrain's K), at most the network's
    blocks (what `--recompute segments:S` runs); 0 skips the job."""
    from edgetrain.models import create_model  # imports torch: in the parent only
    s = modules if requested is None else requested
    if s < 0:
        raise UserError(f"--ckpt-segments must be >= 0 (got {s}; 0 skips e2e+ckpt)")
    return min(s, len(create_model(model, tuple(input_shape), 10, width, depth).blocks)) if s else 0


def bench_cap(model: str, input_shape, batch: int, modules: int, mode: str = "sequential",
              width: int | None = None, depth: int | None = None, steps: int = 2,
              threads: int = 2, cap_mib: float | None = None, tol_mib: float = 32,
              max_probes: int = 16, out_dir: Path = Path("benchmarks/results"),
              timeout_s: float = 3600, log: Callable[[str], None] | None = None,
              recompute: str = "none", split: str = "depth",
              ckpt_segments: int | None = None) -> dict:
    """Run e2e, e2e+ckpt and edgetrain (`mode`, K = `modules`) under RLIMIT_AS caps; write
    JSON and Markdown.

    Args:
        model, input_shape, batch, width, depth, steps: the training job (synthetic data).
        modules, mode: edgetrain's K and regime (sequential or multilap: one module resident).
        recompute, split: edgetrain's `--recompute` (none, blocks, segments:S) and `--split`.
        ckpt_segments: S of e2e with torch.utils.checkpoint over S segments of blocks (default
            `modules`, at most the network's blocks; 0 skips that job).
        cap_mib: also run every job at this cap (MiB of address space), if given.
        tol_mib, max_probes: bisection resolution and budget (per bisected job).

    Returns:
        The result dict (also written as JSON and Markdown under out_dir), with `json_path`
        and `md_path`.

    Raises:
        UserError: a bad option, or a job that fails even without a cap.
    """
    log = log or (lambda s: None)
    segs = _ckpt_segments(model, input_shape, width, depth, modules, ckpt_segments)
    jobs = _jobs(model, input_shape, batch, modules, mode, width, depth, steps, recompute, split,
                 segs)
    # batch 16: 8 random synthetic labels leave classes without a training sample (refused)
    warm_cfg = bench_config("kmresnet", (1, 8, 8), 16, "e2e", 1, False, 1, "cpu", 4, 2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgetrain-bench-cap-") as tmp:
        run = _Runner(tmp, threads, timeout_s, log)
        warm = run(warm_cfg, None, "runtime")
        uncapped = {name: run(cfg, None, JOB_NAMES[name]) for name, cfg in jobs.items()}
        for name, r in (("tiny runtime", warm), *((JOB_NAMES[n], r) for n, r in uncapped.items())):
            if not r.get("ok"):
                raise UserError(f"the {name} job fails even without a cap: {r.get('error')}")
        base = uncapped["edgetrain"]["import_address_space_bytes"]
        searches = {name: _smallest_cap(run, jobs[name], JOB_NAMES[name], base,
                                        uncapped[name]["peak_address_space_bytes"],
                                        int(tol_mib * MIB), max_probes)
                    for name in jobs if name != "e2e"}
        # edgetrain's entry is the run that completed at exactly this cap
        cap = searches["edgetrain"].min_cap
        at = {"cap_mib": _mib(cap), "edgetrain": searches["edgetrain"].run_at_min,
              **{n: run(jobs[n], cap, JOB_NAMES[n]) for n in jobs if n != "edgetrain"}}
        user = None
        if cap_mib is not None:
            user = {"cap_mib": cap_mib, **{n: run(cfg, int(cap_mib * MIB), JOB_NAMES[n])
                                           for n, cfg in jobs.items()}}
    job = {"model": model, "input_shape": list(input_shape), "batch_size": batch,
           "modules": modules, "mode": mode, "recompute": recompute, "split": split,
           "ckpt_segments": segs, "steps_per_module": steps, "threads": threads}
    result = _result(job, warm, uncapped, searches, at, user, base, tol_mib)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return write_cap_result(result, Path(out_dir))


def _brief(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {"completed": bool(r.get("ok")), "error": r.get("error"),
            "peak_address_space_mib": _mib(r.get("peak_address_space_bytes")),
            "peak_rss_mib": _mib(r.get("peak_rss_bytes")), "step_s": r.get("step_s"),
            "wall_s": round(r.get("child_wall_s", 0), 1)}


def _frac(x, base, ref) -> float | None:
    return None if x is None or ref - base <= 0 else round((x - base) / (ref - base), 3)


def _bisection(s: _Search | None, base: int, tol_mib: float) -> dict | None:
    if s is None:
        return None
    return {"tol_mib": tol_mib, "probes": s.probes, "verified_upper_cap_mib": _mib(s.verified),
            "largest_failed_cap_mib": None if s.max_failed == base else _mib(s.max_failed),
            "resolution_mib": _mib(s.min_cap - s.max_failed)}


def _result(job: dict, warm: dict, uncapped: dict, searches: dict, at: dict, user: dict | None,
            base: int, tol_mib: float) -> dict:
    e2e, edge, ckpt = uncapped["e2e"], uncapped["edgetrain"], uncapped.get("e2e_ckpt")
    e2e_as, rss_base = e2e["peak_address_space_bytes"], edge["import_rss_bytes"]
    warm_as, warm_rss = warm["peak_address_space_bytes"], warm["peak_rss_bytes"]
    min_cap, ck = searches["edgetrain"].min_cap, searches.get("e2e_ckpt")
    frac = _frac(min_cap, base, e2e_as)
    at_e2e_failed, at_edge_ok = not at["e2e"].get("ok"), bool(at["edgetrain"].get("ok"))
    names = ("e2e", "e2e_ckpt", "edgetrain")
    res = {"benchmark": "cap", "edgetrain_version": __version__, "limit": "RLIMIT_AS (setrlimit in "
           "the child before importing torch; caps include the runtime's address space)",
           **{k: v for k, v in job.items() if k != "ckpt_segments"}, "data": "synthetic",
           "runtime_import_address_space_mib": _mib(base),
           "runtime_import_rss_mib": _mib(rss_base),
           "uncapped": {n: _brief(uncapped.get(n)) for n in names},
           "bisection": _bisection(searches["edgetrain"], base, tol_mib),
           "min_cap_mib": _mib(min_cap),
           "at_min_cap": {"cap_mib": at["cap_mib"], **{n: _brief(at.get(n)) for n in names}},
           "min_cap_fraction_of_e2e_peak_above_runtime": frac,
           "rss_fraction_of_e2e_above_runtime": _frac(
               edge["peak_rss_bytes"], rss_base, e2e["peak_rss_bytes"]),
           "peak_fraction_of_e2e_above_runtime": _frac(
               edge["peak_address_space_bytes"], base, e2e_as),
           "ckpt_segments": job["ckpt_segments"],
           "ckpt_is": "e2e with torch.utils.checkpoint over ckpt_segments equal segments of "
                      "blocks (--mode e2e --recompute segments:S); 0: not run",
           "ckpt_bisection": _bisection(ck, base, tol_mib),
           "ckpt_min_cap_mib": _mib(ck.min_cap) if ck else None,
           "ckpt_at_own_min_cap": _brief(ck.run_at_min) if ck else None,
           "ckpt_min_cap_fraction_of_e2e_peak_above_runtime": _frac(
               ck.min_cap if ck else None, base, e2e_as),
           "ckpt_peak_fraction_of_e2e_above_runtime": _frac(
               ckpt["peak_address_space_bytes"] if ckpt else None, base, e2e_as),
           "ckpt_rss_fraction_of_e2e_above_runtime": _frac(
               ckpt["peak_rss_bytes"] if ckpt else None, rss_base, e2e["peak_rss_bytes"]),
           "runtime_warm_address_space_mib": _mib(warm_as), "runtime_warm_rss_mib": _mib(warm_rss),
           "runtime_warm_is": "peak of a tiny end-to-end job (kmresnet 1x8x8, batch 16, one step) "
                              "in a child run the same way",
           "min_cap_fraction_of_e2e_peak_above_warm_runtime": _frac(
               min_cap, warm_as, e2e_as),
           "rss_fraction_of_e2e_above_warm_runtime": _frac(
               edge["peak_rss_bytes"], warm_rss, e2e["peak_rss_bytes"]),
           "goal": "e2e fails and edgetrain completes at a cap <= 0.25 x e2e's peak above the "
                   "runtime (address space after imports)",
           "goal_met": bool(at_e2e_failed and at_edge_ok and frac is not None and frac <= 0.25),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if user:
        res["at_user_cap"] = {"cap_mib": user["cap_mib"], **{n: _brief(user.get(n)) for n in names}}
    return res


def cap_stem(result: dict) -> str:
    """`cap_<model>_<CxHxW>_b<batch>_<mode>-K<K>[-<recompute>][-split-memory]`."""
    shape = "x".join(str(s) for s in result["input_shape"])
    stem = (f"cap_{result['model']}_{shape}_b{result['batch_size']}_"
            f"{result['mode']}-K{result['modules']}")
    if result.get("recompute", "none") != "none":
        stem += "-" + result["recompute"].replace(":", "")
    if result.get("split", "depth") != "depth":
        stem += f"-split-{result['split']}"
    return stem


def write_cap_result(result: dict, out_dir: Path) -> dict:
    """Write `<stem>.json` and its Markdown page `<stem>.md`; returns `result` with their paths."""
    return write_json_and_markdown(result, Path(out_dir), cap_stem(result), format_cap)


def _job_label(result: dict, name: str) -> str:
    if name == "e2e_ckpt":
        return f"e2e+ckpt (S={result['ckpt_segments']})"
    if name == "edgetrain":
        rc, split = result.get("recompute", "none"), result.get("split", "depth")
        return (f"edgetrain ({result['mode']}, K={result['modules']}"
                f"{'' if rc == 'none' else ', recompute ' + rc}, split {split})")
    return "e2e"


def _cell(v, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def cap_table(result: dict) -> list[str]:
    """A Markdown table, one row per job: uncapped peaks, minimal cap, fractions of e2e."""
    u, a = result["uncapped"], result["at_min_cap"]
    mins = {"e2e": (None, None), "edgetrain": (result["min_cap_mib"],
            result["min_cap_fraction_of_e2e_peak_above_runtime"]),
            "e2e_ckpt": (result.get("ckpt_min_cap_mib"),
                         result.get("ckpt_min_cap_fraction_of_e2e_peak_above_runtime"))}
    peaks = {"e2e": 1.0, "edgetrain": result["peak_fraction_of_e2e_above_runtime"],
             "e2e_ckpt": result.get("ckpt_peak_fraction_of_e2e_above_runtime")}
    lines = ["| job | uncapped peak address space (MiB) | uncapped peak RSS (MiB) | peak / e2e's "
             "| minimal cap (MiB) | minimal cap / e2e's peak | at edgetrain's minimal cap |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for n in ("e2e", "e2e_ckpt", "edgetrain"):
        if u.get(n) is None:
            continue
        cap, frac = mins[n]
        state = "completed" if a[n]["completed"] else "FAILED"
        lines.append(f"| {_job_label(result, n)} | {_cell(u[n]['peak_address_space_mib'])} | "
                     f"{_cell(u[n]['peak_rss_mib'])} | {_cell(peaks[n], '.3f')} | {_cell(cap)} | "
                     f"{_cell(frac, '.3f')} | {state} |")
    return lines


def format_cap(result: dict) -> str:
    """The Markdown page of a cap result: the table per job, then the figures around it."""
    b = result["bisection"]
    lines = [f"# bench cap: {result['model']} {'x'.join(map(str, result['input_shape']))}, "
             f"batch {result['batch_size']}", "",
             "Fractions are of e2e's peak address space above the runtime's after imports "
             f"({result['runtime_import_address_space_mib']:.0f} MiB address space, "
             f"{result['runtime_import_rss_mib']:.0f} MiB RSS).", "", *cap_table(result), "",
             f"- edgetrain at {result['min_cap_mib']:.0f} MiB: e2e "
             f"{'completed' if result['at_min_cap']['e2e']['completed'] else 'FAILED'}; "
             f"RSS above runtime, edgetrain / e2e = {result['rss_fraction_of_e2e_above_runtime']}",
             f"- above the warm runtime ({result['runtime_warm_address_space_mib']:.0f} MiB): "
             "min cap "
             f"{result['min_cap_fraction_of_e2e_peak_above_warm_runtime']} x e2e's peak, RSS "
             f"{result['rss_fraction_of_e2e_above_warm_runtime']}",
             f"- bisection (edgetrain): {len(b['probes'])} probes, resolution "
             f"{b['resolution_mib']} MiB"]
    if result.get("ckpt_bisection"):
        c = result["ckpt_bisection"]
        lines.append(f"- bisection (e2e+ckpt): {len(c['probes'])} probes, resolution "
                     f"{c['resolution_mib']} MiB")
    lines.append(f"- total {result['wall_s']:.0f} s; goal met: {result['goal_met']} "
                 f"({result['goal']})")
    if "at_user_cap" in result:
        c = result["at_user_cap"]
        lines.append(f"- at --cap-mib {c['cap_mib']}: " + ", ".join(
            f"{JOB_NAMES[n]} {'completed' if c[n]['completed'] else 'FAILED'}"
            for n in JOB_NAMES if c.get(n)))
    return "\n".join(lines) + "\n"
