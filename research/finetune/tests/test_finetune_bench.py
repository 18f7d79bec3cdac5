"""The finetune benchmark's summary: paired gains and same-seed ratios (no training here; the
benchmark itself is `research/finetune/run.py`)."""
from __future__ import annotations

import pytest

from research.finetune.finetune import ARMS, FinetuneGrid, markdown, smoke_grid, summarize


def fake_run(seed: int, acc: dict, secs: dict, mib: dict) -> dict:
    run = {"seed": seed}
    for arm in ("pretrain", *ARMS):
        run[arm] = {"best_test_acc": acc.get(arm, 0.5), "train_s": secs.get(arm, 1.0),
                    "peak_mib": mib.get(arm, 100.0), "uptime_before": "load average: 1.0",
                    "uptime_after": "load average: 2.0"}
    return run


def test_summary_pairs_seeds_and_takes_same_seed_ratios():
    runs = [fake_run(s, {"scratch": 0.6 + s / 100, "init-all": 0.7 + s / 100},
                     {"init-all": 10.0 * (s + 1), "init-last": 4.0 * (s + 1)},
                     {"init-all": 200.0, "init-last": 150.0}) for s in range(3)]
    s = summarize(runs)
    assert s["gain_init_vs_scratch"]["mean"] == pytest.approx(0.1)
    assert s["gain_init_vs_scratch"]["ci95"] == pytest.approx(0.0, abs=1e-12)  # same gain each seed
    assert s["last_vs_all_time"]["mean"] == pytest.approx(0.4)
    assert s["last_vs_all_peak"]["mean"] == pytest.approx(0.75)
    md = markdown({"grid": FinetuneGrid().__dict__, "summary": s, "runs": runs, "wall_s": 60})
    assert "shared" in md and "load average: 1.0" in md and "0.40" in md


def test_grids_make_valid_configs(tmp_path):
    for grid in (FinetuneGrid(), smoke_grid()):
        k = grid.base["modules"]
        last = grid.target_cfg("init-last", 0, tmp_path)
        assert last.train_modules == (k, k) and last.init == str(tmp_path)
        assert grid.target_cfg("scratch", 0, tmp_path).init is None
        assert grid.pretrain_cfg(0).classes == grid.source_classes
