#!/usr/bin/env python
"""What a user installs: the wheel's contents (python .ci/check_wheel.py WHEEL).

It must hold the package, its six shipped device profiles and its recipes, and nothing of the repository
around it: no research/, tests/ or benchmarks/, no research module inside edgetrain/bench/.
Prints the wheel's files and lines; exit 1 with a reason when a check fails.
"""
from __future__ import annotations

import sys
import zipfile

PROFILES = {"cpu-2gb", "jetson-agx-orin-32gb", "jetson-nano-4gb", "jetson-orin-nano-8gb",
            "raspberry-pi-4-4gb", "raspberry-pi-5-8gb"}
RESEARCH = ("accuracy", "accuracy_report", "paper_cpu", "paper_cpu_report", "investigate",
            "presets", "head_cost", "finetune", "speedups", "allocator", "folder_accuracy",
            "distributed")


def problems(names: list[str]) -> list[str]:
    out = []
    profiles = {n.split("/")[-1][:-5] for n in names if n.startswith("edgetrain/devices/")
                and n.endswith(".toml")}
    if profiles != PROFILES:
        out.append(f"shipped profiles {sorted(profiles)} != {sorted(PROFILES)}")
    recipes = {n.split("/")[-1][:-5] for n in names if n.startswith("edgetrain/recipes/")
               and n.endswith(".toml")}
    if "quickstart" not in recipes or len(recipes) < 6:
        out.append(f"shipped recipes {sorted(recipes)}: quickstart and the five others missing")
    for top in ("research/", "tests/", "benchmarks/", "docs/", "recipes/"):
        if any(n.startswith(top) for n in names):
            out.append(f"the wheel holds {top}")
    stray = [n for n in names if n.startswith("edgetrain/bench/") and
             n.rsplit("/", 1)[-1][:-3] in RESEARCH]
    if stray:
        out.append(f"research modules in the package: {stray}")
    if not any(n == "edgetrain/cli.py" for n in names):
        out.append("no edgetrain/cli.py")
    return out


def main(path: str) -> int:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        py = [n for n in names if n.endswith(".py")]
        lines = sum(z.read(n).count(b"\n") for n in py)
    print(f"{path}: {len(names)} files, {len(py)} Python files, {lines} lines of Python")
    bad = problems(names)
    for b in bad:
        print(f"wheel check failed: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
