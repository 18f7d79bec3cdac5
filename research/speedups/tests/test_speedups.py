"""The allocator and speed-ups studies: their summaries and a tiny run of each variant."""
from __future__ import annotations

import json

import pytest


def test_allocator_bench_summary_pairs_rounds():
    from research.speedups.allocator import summarise
    runs = [{"round": 0, "policy": "system", "wall_s": 10.0, "user_s": 1, "system_s": 1,
             "peak_rss_mib": 100.0},
            {"round": 0, "policy": "compact", "wall_s": 12.0, "user_s": 1, "system_s": 2,
             "peak_rss_mib": 90.0},
            {"round": 1, "policy": "system", "wall_s": 20.0, "user_s": 1, "system_s": 1,
             "peak_rss_mib": 100.0},
            {"round": 1, "policy": "compact", "wall_s": 22.0, "user_s": 1, "system_s": 2,
             "peak_rss_mib": 80.0}]
    rows = {r["policy"]: r for r in summarise(runs, ["system", "compact"])}
    assert rows["system"]["wall_vs_system"] == 1.0
    assert rows["compact"]["wall_vs_system_each"] == [1.2, 1.1]
    assert rows["compact"]["wall_vs_system"] == pytest.approx(1.15)
    assert rows["compact"]["rss_vs_system"] == pytest.approx(0.85)


def test_allocator_bench_refuses_a_bad_policy_before_running(tmp_path):
    from research.speedups.allocator import run_allocator
    with pytest.raises(ValueError, match="EDGETRAIN_MALLOC"):
        run_allocator(tmp_path, {"default": 1}, ["system", "mmap:64"])
    assert not list(tmp_path.iterdir())


def test_speedups_bench_runs_every_variant_on_a_tiny_network(tmp_path):
    from research.speedups.speedups import run_speedups
    res = run_speedups(tmp_path, model="resnet20", input_shape=(1, 8, 8), batch=8, modules=2,
                       rounds=1, warmup=1, steps=2, compile_=False)
    names = [r["variant"] for r in res["rows"]]
    assert names[0] == "baseline" and res["rows"][0]["ratio"] == 1.0
    assert {"channels_last", "sgd foreach", "sgd fused"} <= set(names)
    assert all(r["step_ms"] > 0 for r in res["rows"])
    saved = json.loads((tmp_path / "speedups.json").read_text())
    assert saved["rows"] == res["rows"] and (tmp_path / "speedups.md").read_text().count("|") > 10

