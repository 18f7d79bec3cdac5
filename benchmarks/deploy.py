"""Deployment past PyTorch (issue #30): fp32 ONNX, int8 ONNX and ExecuTorch programs compared.

usage: python benchmarks/deploy.py [--out benchmarks/results] [--work DIR] [--rounds 7]
       [--images 200] [--nets digits,digits32]

For each network it trains the run (once; reused from --work), exports the best depth as
fp32 + int8 ONNX (`export --quantize int8`) and as fp32 + int8 ExecuTorch programs
(`export --format pte --quantize int8`), and tabulates file size, test accuracy, latency
at batch 1 (ONNX Runtime: 1 thread, ExecuTorch/XNNPACK: thread pool reset to 1; median of
200 calls) and agreement on `--images` test images written as PNG files, predicted by
`edgetrain predict` from RUN_DIR, from each file (the .onnx ones in a process where
`import torch` fails). Then start-up + first prediction of one image and peak RSS of
`edgetrain predict FILE.onnx` against `edgetrain predict RUN_DIR`, in fresh processes,
alternating, `--rounds` each. Networks: `digits` is `edgetrain train`'s defaults;
`digits32` the digits as 3x32x32 RGB images (an image folder of the 8x8 PNGs upsampled
by the run's resize policy), kmresnet defaults, 4 epochs per module, exported at its best
depth and whole (depth 4). Writes
deploy.json and deploy.md under --out; load averages are recorded (the machine is shared:
compare ratios). Needs the `export` and `executorch` extras.
"""
import argparse
import json
import os
from pathlib import Path
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NETS = {
    "digits": {"title": "digits (1x8x8), `edgetrain train` defaults", "args": [],
               "depths": ["best"]},
    "digits32": {"title": "digits as 3x32x32 RGB (image folder, --image-size 32x32)",
                 "args": ["--image-size", "32x32", "--channels", "3", "--epochs", "4"],
                 "folder": True, "depths": ["best", "4"]},
}


def sh(cmd, env=None, **kw):
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if res.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{res.stderr[-2000:]}")
    return res.stdout


def edgetrain(*args):
    return [sys.executable, "-m", "edgetrain.cli", *map(str, args)]


def digits_folder(root: Path) -> Path:
    """sklearn's digits as an image folder of 8x8 RGB PNGs, one sub-folder per class."""
    from sklearn.datasets import load_digits
    if root.exists():
        return root
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        px = (img * (255 / 16)).round().astype(np.uint8)
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).convert("RGB").save(root / str(y) / f"{i:04d}.png")
    return root


def trained(name: str, work: Path) -> Path:
    run = work / f"run-{name}"
    if not (run / "metrics.json").exists():
        data = ["--data", digits_folder(work / "digits-folder")] if NETS[name].get("folder") else []
        t0 = time.time()
        sh(edgetrain("train", *data, *NETS[name]["args"], "--out", run, "--no-progress",
                     "--data-cache", work / "data-cache"))
        print(f"trained {name} in {time.time() - t0:.0f} s", flush=True)
    return run


def test_pngs(run: Path, n: int, out: Path) -> Path:
    """The run's first `n` test images (pack pixels, exactly) as PNG files."""
    from edgetrain.regimes.run import load_run
    out.mkdir(parents=True, exist_ok=True)
    x = load_run(run).data.test.x[:n].numpy()  # (n, C, H, W) uint8
    for i, row in enumerate(x):
        img = row[0] if row.shape[0] == 1 else row.transpose(1, 2, 0)
        Image.fromarray(img).save(out / f"{i:03d}.png")
    return out


def no_torch_env(work: Path) -> dict:
    fake = work / "no_torch" / "torch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text(  # what a missing torch raises
        'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), str(REPO)]))


def top1(model, images: Path, env=None, depth="best") -> list[str]:
    doc = json.loads(sh(edgetrain("predict", model, images, "--json", "--top-k", "1",
                                  "--depth", depth), env=env))
    return [p["top"][0]["class"] for p in doc["predictions"]]


def timed_process(cmd, tmp: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh process, measured by /usr/bin/time: a child
    forked from this (large) process would inherit its high-water mark through exec."""
    stats = tmp / "time.txt"
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(stats), *cmd],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{cmd} failed: {res.stderr[-1000:]}")
    return wall, int(stats.read_text().split()[-1]) / 1024  # KiB -> MiB


def startup(run: Path, onnx_file: Path, image: Path, rounds: int, tmp: Path) -> dict:
    """Start-up + first prediction of one image: predict FILE.onnx vs predict RUN_DIR."""
    cmds = {"onnx_file": edgetrain("predict", onnx_file, image),
            "run_dir": edgetrain("predict", run, image)}
    got = {k: [] for k in cmds}
    for _ in range(rounds):  # alternating, so a load change hits both
        for k, cmd in cmds.items():
            got[k].append(timed_process(cmd, tmp))
    med = {k: {"wall_s": statistics.median(w for w, _ in v),
               "peak_rss_mib": statistics.median(r for _, r in v),
               "wall_s_all": [w for w, _ in v], "peak_rss_mib_all": [r for _, r in v]}
           for k, v in got.items()}
    med["ratio_wall"] = med["onnx_file"]["wall_s"] / med["run_dir"]["wall_s"]
    med["ratio_rss"] = med["onnx_file"]["peak_rss_mib"] / med["run_dir"]["peak_rss_mib"]
    return med


def bench_net(name: str, depth: str, work: Path, n_images: int, rounds: int) -> dict:
    from executorch.extension.pybindings import portable_lib
    from edgetrain.export.onnx_export import export_prefix
    from edgetrain.export.pte import export_pte
    run = trained(name, work)
    out = work / f"files-{name}-{depth}"
    onnx_rep = export_prefix(run, depth=depth, quantize="int8", out=out / "prefix.onnx")
    portable_lib._unsafe_reset_threadpool(1)  # XNNPACK on one thread, as ORT's latency
    pte_rep = export_pte(run, depth=depth, quantize="int8", out=out / "prefix.pte")
    images = test_pngs(run, n_images, out / "png")
    env = no_torch_env(work)
    ref = top1(run, images, depth=depth)
    files = {"onnx fp32": (onnx_rep["path"], env), "onnx int8": (onnx_rep["int8"]["path"], env),
             "pte fp32": (pte_rep["programs"]["fp32"]["path"], None),
             "pte int8": (pte_rep["programs"]["int8"]["path"], None)}
    preds = {k: top1(p, images, e, str(onnx_rep["depth"])) for k, (p, e) in files.items()}
    agree = {k: sum(a == b for a, b in zip(v, ref)) for k, v in preds.items()}
    agree_onnx = {k: sum(a == b for a, b in zip(v, preds["onnx fp32"])) for k, v in preds.items()}
    return {"title": NETS[name]["title"], "run": str(run), "depth": onnx_rep["depth"],
            "n_modules": onnx_rep["n_modules"], "onnx": onnx_rep, "pte": pte_rep,
            "n_images": len(ref), "agree_with_run_dir": agree, "agree_with_onnx_fp32": agree_onnx,
            "startup": None if depth != "best" else
            startup(run, Path(onnx_rep["path"]), images / "000.png", rounds, out)}


def rows(r: dict) -> list[tuple]:
    q, p = r["onnx"]["int8"], r["pte"]["programs"]
    a, n = r["agree_with_run_dir"], r["n_images"]
    return [("ONNX fp32", q["fp32_bytes"], q["fp32_acc"], q["fp32_latency_ms"], 0.0, a["onnx fp32"]),
            ("ONNX int8", q["int8_bytes"], q["int8_acc"], q["int8_latency_ms"],
             q["max_abs_logit_diff"], a["onnx int8"]),
            ("ExecuTorch fp32 (XNNPACK)", p["fp32"]["file_bytes"], p["fp32"]["test_acc"],
             p["fp32"]["latency_ms"], p["fp32"]["max_abs_diff"], a["pte fp32"]),
            ("ExecuTorch int8 (XNNPACK)", p["int8"]["file_bytes"], p["int8"]["test_acc"],
             p["int8"]["latency_ms"], p["int8"]["max_abs_diff"], a["pte int8"])], n


def markdown(res: dict) -> str:
    out = ["# Deployment: fp32 ONNX, int8 ONNX, ExecuTorch", "",
           f"Machine: {res['cpu']}; load average {res['load_before']} before, "
           f"{res['load_after']} after (shared machine: read the ratios). "
           "Latency: batch 1, one thread, median of 200 calls. Max |logit diff|: ONNX int8 "
           "vs the fp32 file on the test split; ExecuTorch vs PyTorch on 256 check inputs. "
           "Agreement: top-1 on the test images as PNG files, against `edgetrain predict "
           "RUN_DIR`.", ""]
    for name, r in res["nets"].items():
        table, n = rows(r)
        best = " (the best, chosen on validation)" if name.endswith("@best") else ""
        out += [f"## {r['title']}: depth {r['depth']} of {r['n_modules']}{best}", "",
                "| file | size | test acc | ms/image | max abs logit diff | agrees with RUN_DIR |",
                "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {t} | {b / 1024:.0f} KiB | {acc:.4f} | {ms:.3f} | {d:.3g} | {g}/{n} |"
                for t, b, acc, ms, d, g in table]
        s, q = r["startup"], r["onnx"]["int8"]
        out += ["", f"int8 / fp32 ONNX file: {q['int8_bytes'] / q['fp32_bytes']:.2f}x; "
                f"`predict FILE.pte` agrees with the fp32 ONNX file on "
                f"{r['agree_with_onnx_fp32']['pte fp32']}/{n} images.", ""]
        if s is None:
            continue
        out += [f"Start-up + first prediction of one image, fresh processes, median of "
                f"{len(s['onnx_file']['wall_s_all'])}: `predict FILE.onnx` "
                f"{s['onnx_file']['wall_s']:.2f} s, {s['onnx_file']['peak_rss_mib']:.0f} MiB peak RSS; "
                f"`predict RUN_DIR` {s['run_dir']['wall_s']:.2f} s, "
                f"{s['run_dir']['peak_rss_mib']:.0f} MiB (ratios {s['ratio_wall']:.2f}x time, "
                f"{s['ratio_rss']:.2f}x memory).", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default="/tmp/edgetrain-deploy-bench")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--nets", default="digits,digits32")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "unknown")
    res = {"cpu": f"{cpu}, {os.cpu_count()} CPUs", "load_before": os.getloadavg(), "nets": {}}
    for name in a.nets.split(","):
        for depth in NETS[name]["depths"]:
            res["nets"][f"{name}@{depth}"] = bench_net(name, depth, work, a.images, a.rounds)
    res["load_after"] = os.getloadavg()
    res["load_before"] = [round(v, 2) for v in res["load_before"]]
    res["load_after"] = [round(v, 2) for v in res["load_after"]]
    out = Path(a.out)
    (out / "deploy.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "deploy.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
