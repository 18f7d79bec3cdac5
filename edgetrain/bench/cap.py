"""`edgetrain bench cap`: the same training job end-to-end and with edgetrain under one OS limit.

The limit is `RLIMIT_AS` (virtual address space), set with `resource.setrlimit` in each child
before it imports torch (`edgetrain.bench.memory.child_main`), so a cap is an absolute figure
that includes the runtime's own address space (a CPU build of torch maps several hundred MiB,
a CUDA build ~3.2 GiB; the cap sits above that). A child that hits the cap fails with an
allocation error and is reported as failed. Each child runs `edgetrain.train` on
synthetic data in a fresh process.

Steps: both jobs uncapped (their peak address space and peak RSS), a cap at which edgetrain
completes (its peak plus headroom, grown until a run completes: the address-space peak varies
between runs), a bisection below it down to `tol_mib` for the smallest such cap (every probe
logged and kept), then end-to-end at that cap. Fractions of end-to-end's peak are reported
above the runtime's own baseline (address space after imports), and also for RSS from the
uncapped runs. A third child, a tiny end-to-end job, gives the warm runtime (imports plus
what any first training step maps: creating a torch optimizer imports torch._dynamo and
triton, ~180 MiB of shared library and ~90 MiB of heap on the CPU build): the fractions
above that baseline are reported next to the import-based ones.

This file does not parse argv (`edgetrain bench cap` and `benchmarks/cap.py` do).
"""
from __future__ import annotations

from pathlib import Path
import tempfile
import time
from typing import Callable

from edgetrain import __version__
from edgetrain.bench.memory import bench_config, run_child
from edgetrain.errors import UserError
from edgetrain.storage.atomic import atomic_write_json
from edgetrain.units import MIB


def _mib(v) -> float | None:
    return None if v is None else round(v / MIB, 2)


class _Runner:
    """Runs children of one job pair in a scratch directory, numbering run directories."""

    def __init__(self, tmp: str, threads: int, timeout_s: float, log):
        self.tmp, self.threads, self.timeout_s, self.log, self.i = tmp, threads, timeout_s, log, 0

    def __call__(self, cfg, cap: int | None, what: str) -> dict:
        self.i += 1
        spec = {"cfg": cfg.to_dict() | {"cache_dir": f"{self.tmp}/cache{self.i}"},
                "out_dir": f"{self.tmp}/run{self.i}", "threads": self.threads,
                "rlimit_as_bytes": cap}
        res = run_child(spec, self.timeout_s)
        cap_s = "no cap" if cap is None else f"cap {cap / MIB:.0f} MiB"
        self.log(f"{what:<9} {cap_s:<16} {'completed' if res.get('ok') else 'FAILED'} "
                 f"in {res.get('child_wall_s', 0):.0f} s"
                 f"{'' if res.get('ok') else ': ' + str(res.get('error'))[:120]}")
        return res


def _verified_hi(run: _Runner, cfg, base: int, peak: int) -> tuple[int, dict]:
    """A cap at which `cfg` completes: its uncapped peak plus headroom, grown until it does
    (the address-space peak varies by tens of MiB between runs: thread arenas, mmaps)."""
    hi = peak + 64 * MIB
    for _ in range(4):
        res = run(cfg, hi, "edgetrain")
        if res.get("ok"):
            return hi, res
        hi += max(128 * MIB, (hi - base) // 4)
    raise RuntimeError(f"edgetrain did not complete even at a cap of {hi / MIB:.0f} MiB")


def _bisect(run: _Runner, cfg, lo: int, hi: int, hi_res: dict, tol: int, max_probes: int
            ) -> tuple[int, dict, list, int]:
    """Smallest cap in (lo, hi] at which `cfg` completed, the run that completed there, the
    probes, and the largest cap at which it failed (`lo` if no probe failed)."""
    probes = []
    while hi - lo > tol and len(probes) < max_probes:
        mid = (lo + hi) // 2
        res = run(cfg, mid, f"probe {len(probes) + 1}")
        probes.append({"cap_mib": _mib(mid), "completed": bool(res.get("ok")),
                       "peak_address_space_mib": _mib(res.get("peak_address_space_bytes")),
                       "wall_s": round(res.get("child_wall_s", 0), 1),
                       "error": None if res.get("ok") else str(res.get("error"))[:200]})
        if res.get("ok"):
            hi, hi_res = mid, res
        else:
            lo = mid
    return hi, hi_res, probes, lo


def bench_cap(model: str, input_shape, batch: int, modules: int, mode: str = "sequential",
              width: int | None = None, depth: int | None = None, steps: int = 2,
              threads: int = 2, cap_mib: float | None = None, tol_mib: float = 32,
              max_probes: int = 16, out_dir: Path = Path("benchmarks/results"),
              timeout_s: float = 3600, log: Callable[[str], None] | None = None) -> dict:
    """Run e2e and edgetrain (`mode`, K = `modules`) under RLIMIT_AS caps; write JSON.

    Args:
        model, input_shape, batch, width, depth, steps: the training job (synthetic data).
        modules, mode: edgetrain's K and regime (sequential or multilap: one module resident).
        cap_mib: also run both jobs at this cap (MiB of address space), if given.
        tol_mib, max_probes: bisection resolution and budget.

    Returns:
        The result dict (also written as JSON under out_dir), with `json_path`.

    Raises:
        UserError: a job that fails even without a cap.
    """
    log = log or (lambda s: None)
    e2e_cfg = bench_config(model, input_shape, batch, "e2e", 1, False, steps, "cpu", width, depth)
    edge_cfg = bench_config(model, input_shape, batch, mode, modules, True, steps, "cpu", width, depth)
    warm_cfg = bench_config("kmresnet", (1, 8, 8), 8, "e2e", 1, False, 1, "cpu", 4, 2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgetrain-bench-cap-") as tmp:
        run = _Runner(tmp, threads, timeout_s, log)
        warm = run(warm_cfg, None, "runtime")
        e2e, edge = run(e2e_cfg, None, "e2e"), run(edge_cfg, None, "edgetrain")
        for name, r in (("tiny runtime", warm), ("end-to-end", e2e), ("edgetrain", edge)):
            if not r.get("ok"):
                raise UserError(f"the {name} job fails even without a cap: {r.get('error')}")
        base = edge["import_address_space_bytes"]
        hi, hi_res = _verified_hi(run, edge_cfg, base, edge["peak_address_space_bytes"])
        min_cap, min_res, probes, max_failed = _bisect(run, edge_cfg, base, hi, hi_res,
                                                       int(tol_mib * MIB), max_probes)
        # edgetrain's entry is the run that completed at exactly this cap
        at = {"cap_mib": _mib(min_cap), "e2e": run(e2e_cfg, min_cap, "e2e"), "edgetrain": min_res}
        user = None
        if cap_mib is not None:
            c = int(cap_mib * MIB)
            user = {"cap_mib": cap_mib, "e2e": run(e2e_cfg, c, "e2e"),
                    "edgetrain": run(edge_cfg, c, "edgetrain")}
    wall_s = time.perf_counter() - t0
    result = _result(locals())
    return write_cap_result(result, Path(out_dir))


def _brief(r: dict) -> dict:
    return {"completed": bool(r.get("ok")), "error": r.get("error"),
            "peak_address_space_mib": _mib(r.get("peak_address_space_bytes")),
            "peak_rss_mib": _mib(r.get("peak_rss_bytes")), "wall_s": round(r.get("child_wall_s", 0), 1)}


def _frac(x, base, ref) -> float | None:
    return None if ref - base <= 0 else round((x - base) / (ref - base), 3)


def _result(v: dict) -> dict:
    e2e, edge, base, min_cap = v["e2e"], v["edge"], v["base"], v["min_cap"]
    rss_base = edge["import_rss_bytes"]
    warm_as, warm_rss = v["warm"]["peak_address_space_bytes"], v["warm"]["peak_rss_bytes"]
    frac = _frac(min_cap, base, e2e["peak_address_space_bytes"])
    at_e2e_failed, at_edge_ok = not v["at"]["e2e"].get("ok"), bool(v["at"]["edgetrain"].get("ok"))
    res = {"benchmark": "cap", "edgetrain_version": __version__, "limit": "RLIMIT_AS (setrlimit in "
           "the child before importing torch; caps include the runtime's address space)",
           "model": v["model"], "input_shape": list(v["input_shape"]), "batch_size": v["batch"],
           "modules": v["modules"], "mode": v["mode"], "steps_per_module": v["steps"],
           "threads": v["threads"], "data": "synthetic",
           "runtime_import_address_space_mib": _mib(base),
           "runtime_import_rss_mib": _mib(rss_base),
           "uncapped": {"e2e": _brief(e2e), "edgetrain": _brief(edge)},
           "bisection": {"tol_mib": v["tol_mib"], "probes": v["probes"],
                         "verified_upper_cap_mib": _mib(v["hi"]),
                         "largest_failed_cap_mib": None if v["max_failed"] == base
                         else _mib(v["max_failed"]),
                         "resolution_mib": _mib(min_cap - v["max_failed"])},
           "min_cap_mib": _mib(min_cap),
           "at_min_cap": {"cap_mib": v["at"]["cap_mib"], "e2e": _brief(v["at"]["e2e"]),
                          "edgetrain": _brief(v["at"]["edgetrain"])},
           "min_cap_fraction_of_e2e_peak_above_runtime": frac,
           "rss_fraction_of_e2e_above_runtime": _frac(
               edge["peak_rss_bytes"], rss_base, e2e["peak_rss_bytes"]),
           "peak_fraction_of_e2e_above_runtime": _frac(
               edge["peak_address_space_bytes"], base, e2e["peak_address_space_bytes"]),
           "runtime_warm_address_space_mib": _mib(warm_as), "runtime_warm_rss_mib": _mib(warm_rss),
           "runtime_warm_is": "peak of a tiny end-to-end job (kmresnet 1x8x8, batch 8, one step) "
                              "in a child run the same way",
           "min_cap_fraction_of_e2e_peak_above_warm_runtime": _frac(
               min_cap, warm_as, e2e["peak_address_space_bytes"]),
           "rss_fraction_of_e2e_above_warm_runtime": _frac(
               edge["peak_rss_bytes"], warm_rss, e2e["peak_rss_bytes"]),
           "goal": "e2e fails and edgetrain completes at a cap <= 0.25 x e2e's peak above the "
                   "runtime (address space after imports)",
           "goal_met": bool(at_e2e_failed and at_edge_ok and frac is not None and frac <= 0.25),
           "wall_s": round(v["wall_s"], 1),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if v["user"]:
        u = v["user"]
        res["at_user_cap"] = {"cap_mib": u["cap_mib"], "e2e": _brief(u["e2e"]),
                              "edgetrain": _brief(u["edgetrain"])}
    return res


def write_cap_result(result: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = "x".join(str(s) for s in result["input_shape"])
    name = (f"cap_{result['model']}_{shape}_b{result['batch_size']}_"
            f"{result['mode']}-K{result['modules']}.json")
    result["json_path"] = str(out_dir / name)
    atomic_write_json(Path(result["json_path"]), result)
    return result


def format_cap(result: dict) -> str:
    """A short human summary of a cap result."""
    u, a = result["uncapped"], result["at_min_cap"]
    lines = [f"runtime after imports: {result['runtime_import_address_space_mib']:.0f} MiB address "
             f"space, {result['runtime_import_rss_mib']:.0f} MiB RSS",
             f"uncapped peaks (address space / RSS): e2e {u['e2e']['peak_address_space_mib']:.0f} / "
             f"{u['e2e']['peak_rss_mib']:.0f} MiB, edgetrain {u['edgetrain']['peak_address_space_mib']:.0f}"
             f" / {u['edgetrain']['peak_rss_mib']:.0f} MiB",
             f"smallest cap at which edgetrain ({result['mode']}, K={result['modules']}) completes: "
             f"{result['min_cap_mib']:.0f} MiB = {result['min_cap_fraction_of_e2e_peak_above_runtime']}"
             " x e2e's peak above the runtime baseline",
             f"at that cap: e2e {'completed' if a['e2e']['completed'] else 'FAILED'}, edgetrain "
             f"{'completed' if a['edgetrain']['completed'] else 'FAILED'}",
             f"RSS above runtime: edgetrain / e2e = {result['rss_fraction_of_e2e_above_runtime']}",
             f"above the warm runtime ({result['runtime_warm_address_space_mib']:.0f} MiB): min cap "
             f"{result['min_cap_fraction_of_e2e_peak_above_warm_runtime']} x e2e's peak, RSS "
             f"{result['rss_fraction_of_e2e_above_warm_runtime']}",
             f"bisection: {len(result['bisection']['probes'])} probes, resolution "
             f"{result['bisection']['resolution_mib']} MiB; total {result['wall_s']:.0f} s"]
    if "at_user_cap" in result:
        c = result["at_user_cap"]
        lines.append(f"at --cap-mib {c['cap_mib']}: e2e {'completed' if c['e2e']['completed'] else 'FAILED'}"
                     f", edgetrain {'completed' if c['edgetrain']['completed'] else 'FAILED'}")
    return "\n".join(lines)
