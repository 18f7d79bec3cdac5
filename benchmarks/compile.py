"""`--compile` on a long run: eager, compiled with a cold inductor cache, compiled warm.

usage: python benchmarks/compile.py [--out benchmarks/results] [--mode parallel]
       [--samples 4096] [--epochs 4] [--threads 2]

Three fresh processes train the same job (resnet20, 3x32x32 synthetic, batch 64, K=4, seed 0;
sequential and multilap compile each module when it starts): without --compile; with it and
an empty inductor cache (TORCHINDUCTOR_CACHE_DIR: a fresh directory, `cold`); then with it
again on the cache the cold run filled (`warm`: a later run, a resumed run). Per run: the
wall time of `train()`, metrics.json's step seconds (training steps only, compilation
included: it happens inside the first steps) and the last module's final training loss.
Run it on a quiet machine; the ratios are to the eager run of the same invocation. Writes
compile.{json,md}.
"""
import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

from edgetrain.bench.results import write_json_and_markdown

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from edgetrain.config import RunConfig
from edgetrain.regimes.schedule import train
cfg = RunConfig.from_dict(json.loads(sys.argv[1]))
t0 = time.perf_counter()
m = train(cfg, Path(sys.argv[2]))
epochs = [json.loads(l) for l in (Path(sys.argv[2]) / "log.jsonl").read_text().splitlines()]
print(json.dumps({"wall_s": time.perf_counter() - t0, "step_s": m["timings"]["step_s"],
                  "last_epoch_s": epochs[-1]["seconds"],
                  "final_train_loss": m["modules"][-1]["history"][-1]["train_loss"],
                  "test_acc": m["modules"][-1]["test_acc"]}))
"""


def job(mode: str, samples: int, epochs: int, compile_: bool) -> dict:
    return dict(data="synthetic", input_shape=[3, 32, 32], synthetic_size=samples,
                model="resnet20", modules=4, mode=mode, epochs=epochs, batch_size=64, seed=0,
                device="cpu", compile=compile_, laps=2 if mode == "multilap" else 1)


def run_child(cfg: dict, out: Path, env: dict, threads: int) -> dict:
    env = {**os.environ, **env, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(out)], env=env,
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def markdown(res: dict) -> str:
    j = res["job"]
    lines = ["# `--compile`: eager, cold and warm", "",
             f"{j['mode']}, resnet20 3x32x32 synthetic, {j['synthetic_size']} samples, "
             f"{j['epochs']} epochs, batch 64, K=4, {res['threads']} threads, fresh process per "
             f"run; load {res['load_before']:.2f} -> {res['load_after']:.2f}. Ratios: to the "
             "eager run. Steps: metrics.json's step seconds (the compilation happens inside the "
             "first steps of each module, so it is in them).", "",
             "| run | train() wall s | wall / eager | steps s | steps / eager | last epoch s "
             "| last epoch / eager | final train loss | test acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    e = res["runs"]["eager"]
    for name, r in res["runs"].items():
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['wall_s'] / e['wall_s']:.3f} | "
                     f"{r['step_s']:.1f} | {r['step_s'] / e['step_s']:.3f} | "
                     f"{r['last_epoch_s']:.1f} | {r['last_epoch_s'] / e['last_epoch_s']:.3f} | "
                     f"{r['final_train_loss']:.5f} | {r['test_acc']:.4f} |")
    lines += ["", f"Cold wall - warm wall (inductor's code generation and C++ builds, which the "
              f"cache keeps): {res['cold_minus_warm_s']:.1f} s. Eager wall - warm wall: "
              f"{res['warm_saving_s']:.1f} s of {e['wall_s']:.1f} s (negative: the warm run was "
              "slower). The last epoch has no compilation in it: its ratio is the compiled "
              "step's speed. Synthetic labels are random, so the losses only show that "
              "compiled runs are not bit-identical to eager ones (fused kernels round "
              "differently), while cold and warm agree."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--mode", default="parallel",
                    choices=["e2e", "parallel", "sequential", "multilap"])
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    load = os.getloadavg()[0]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="edgetrain-compile-") as d:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(Path(d) / "inductor")}
        for name, c in (("eager", False), ("compiled, cold cache", True),
                        ("compiled, warm cache", True)):
            runs[name] = run_child(job(a.mode, a.samples, a.epochs, c),
                                   Path(d) / name.replace(" ", "_").replace(",", ""),
                                   env, a.threads)
            print(name, runs[name], flush=True)
    cold, warm, eager = (runs["compiled, cold cache"], runs["compiled, warm cache"],
                         runs["eager"])
    res = {"benchmark": "compile", "job": job(a.mode, a.samples, a.epochs, True),
           "threads": a.threads, "runs": runs, "load_before": load,
           "load_after": os.getloadavg()[0],
           "cold_minus_warm_s": cold["wall_s"] - warm["wall_s"],
           "warm_saving_s": eager["wall_s"] - warm["wall_s"],
           "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    res = write_json_and_markdown(res, Path(a.out), "compile", markdown)
    print(Path(res["md_path"]).read_text())


if __name__ == "__main__":
    main()
