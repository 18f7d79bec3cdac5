"""Candidate speed-ups of a module's CPU training step, each as a ratio to today's step.

usage: python -m research.speedups.run [--out research/speedups/results] [--model resnet56]
       [--input 3x32x32] [--batch 64] [--modules 4] [--rounds 3] [--steps 15] [--no-compile]
Run it alone on a quiet machine (`uptime`): it measures time.
"""
import argparse
from pathlib import Path

from research.speedups.speedups import run_speedups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="research/speedups/results")
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--input", default="3x32x32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--modules", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--job-steps", type=int, default=200)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--stem", default="speedups")
    a = ap.parse_args()
    res = run_speedups(Path(a.out), a.model, tuple(int(v) for v in a.input.split("x")), a.batch,
                       a.modules, rounds=a.rounds, steps=a.steps, job_steps=a.job_steps,
                       compile_=not a.no_compile, stem=a.stem)
    print(open(res["md_path"]).read())


if __name__ == "__main__":
    main()
