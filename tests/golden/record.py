"""Record the fixed-seed digits runs that tests/test_golden.py compares against.

Run from the project root: `python -m tests.golden.record`. Re-record only when a change
alters results on purpose, and say why in its commit.
"""
from __future__ import annotations

import json
from pathlib import Path
import sys
import tempfile

import torch

HERE = Path(__file__).parent
# fields that measure the machine, not the method
MACHINE_KEYS = ("timings", "peak_rss_mib", "memory", "device", "edgetrain_version")
# fields that restate the configuration, added after the recording (checked elsewhere:
# tests/test_precision.py checks `precision` is fp32 by default)
RESTATED_KEYS = ("precision",)
REGIMES = {
    "e2e": dict(mode="e2e", epochs=2),
    "parallel": dict(mode="parallel", epochs=2),
    "sequential": dict(mode="sequential", epochs=2),
    "multilap": dict(mode="multilap", epochs=2, laps=2),
}
BASE = dict(data="digits", train_size=400, model="kmresnet", width=8, depth=4, modules=2,
            batch_size=64, lr=0.05, seed=0)


def strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in MACHINE_KEYS + RESTATED_KEYS}


def run_regime(name: str, out: Path) -> dict:
    import edgetrain
    cfg = edgetrain.RunConfig(**BASE, **REGIMES[name])
    return strip(edgetrain.train(cfg, out))


def main() -> None:
    torch.set_num_threads(2)
    names = sys.argv[1:] or list(REGIMES)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            m = run_regime(name, Path(tmp) / "run")
        (HERE / f"{name}.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
        print(name, m["best_test_acc"])


if __name__ == "__main__":
    main()
