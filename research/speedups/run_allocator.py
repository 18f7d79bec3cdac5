"""The CLI's allocator policy (EDGETRAIN_MALLOC) per job: time and peak RSS, paired rounds.

usage: python -m research.speedups.run_allocator [--out research/speedups/results] [--rounds 3]
       [--jobs default,speed-resnet56-K4,resnet110-96px-parallel-K4] [--job-rounds NAME=R,...]
       [--policies system,compact,mmap:4,mmap:16] [--threads N]
Run it alone on a quiet machine (`uptime`): it measures wall time.
"""
import argparse
from pathlib import Path

from research.speedups.allocator import JOBS, POLICIES, run_allocator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="research/speedups/results")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--job-rounds", default="", help="per-job rounds, e.g. default=3,other=1")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stem", default="allocator")
    a = ap.parse_args()
    rounds = {j: a.rounds for j in a.jobs.split(",")}
    for kv in filter(None, a.job_rounds.split(",")):
        k, v = kv.split("=")
        rounds[k] = int(v)
    res = run_allocator(Path(a.out), rounds, a.policies.split(","), a.threads, a.stem)
    print(open(res["md_path"]).read())


if __name__ == "__main__":
    main()
