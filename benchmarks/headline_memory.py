"""The README's headline figure: memory per regime against end-to-end and end-to-end with
activation checkpointing, on one job, from results already measured (nothing is re-run).

    python benchmarks/headline_memory.py [--results NAME.json] [--out PATH.png]

Reads `memory_resnet110_3x96x96_b64_cpu-recompute.json` (made by `edgetrain bench memory
--model resnet110 --input 3x96x96 --batch 64 --modules 4 8 16 --recompute blocks --split
memory --tag recompute`), found by file name under benchmarks/results/ or research/, and
draws MiB of tensors (peak RSS minus the runtime) per K: e2e+checkpointing over K segments,
parallel, sequential and multi-lap TRGL, and sequential with `--recompute blocks`, with
plain end-to-end as a line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "memory_resnet110_3x96x96_b64_cpu-recompute.json"
BARS = [  # (label, method, mode, recompute: None = "segments:K")
    ("e2e + checkpointing (K segments)", "E2E+ckpt", "e2e", None),
    ("parallel", "TRGL", "parallel", "none"),
    ("sequential", "TRGL", "sequential", "none"),
    ("multi-lap", "TRGL", "multilap", "none"),
    ("sequential + --recompute blocks", "TRGL", "sequential", "blocks"),
]
COLORS = ["tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:red"]


def find_results(name: str) -> Path:
    """The results file of that name under benchmarks/results/ or research/."""
    for base in (ROOT / "benchmarks" / "results", ROOT / "research"):
        hits = sorted(base.rglob(name)) if base.is_dir() else []
        if hits:
            return hits[0]
    raise SystemExit(f"error: {name} not found under benchmarks/results/ or research/")


def row(rows: list[dict], method: str, mode: str, k: int, recompute: str | None) -> float:
    want = recompute or f"segments:{k}"
    (r,) = [r for r in rows if r["method"] == method and r["mode"] == mode
            and r["modules"] == k and r["recompute"] == want and r["ok"]]
    return r["measured_tensors_mib"]


def draw(res: dict, out: Path) -> None:
    import matplotlib  # the plots extra: only this script needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks, rows = res["modules"], res["rows"]
    e2e = row(rows, "E2E", "e2e", 1, "none")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(BARS)
    for i, ((label, method, mode, rec), color) in enumerate(zip(BARS, COLORS)):
        xs = [j + (i - (len(BARS) - 1) / 2) * width for j in range(len(ks))]
        ys = [row(rows, method, mode, k, rec) for k in ks]
        ax.bar(xs, ys, width, label=label, color=color)
        for x, y in zip(xs, ys):
            ax.text(x, y + 40, f"{y / e2e:.2f}", ha="center", fontsize=7)
    ax.axhline(e2e, color="black", ls="--", lw=1)
    ax.text(-0.45, e2e + 40, f"end-to-end: {e2e:.0f} MiB", ha="left", va="bottom")
    c, h, w = res["input_shape"]
    ax.set(xticks=range(len(ks)), xticklabels=[f"K = {k}" for k in ks], ylim=(0, e2e * 1.12),
           ylabel="peak MiB of tensors (labels: x end-to-end)",
           title=f"Training memory, {res['model']} {c}x{h}x{w}, batch {res['batch_size']}, "
                 f"{res['device']} (measured)")
    ax.legend(title="module-wise: TRGL, --split memory", fontsize=8, title_fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=RESULTS, help="results file name (searched)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory-headline.png"))
    a = p.parse_args()
    draw(json.loads(find_results(a.results).read_text()), Path(a.out))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
