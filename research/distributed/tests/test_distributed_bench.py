"""The distributed scaling study: ratios within each repeat, and (slow) a real run of every arm."""
from __future__ import annotations

import json
import os

import pytest

TINY = ["--data", "digits", "--train-size", "400", "--model", "kmresnet", "--width", "8",
        "--depth", "4", "--modules", "2", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
        "--seed", "0", "--mode", "parallel", "--device", "cpu", "--no-progress"]  # gloo on CPU


def loopback_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **extra}


# ----------------------------------------------------------------------------- benchmark

def test_bench_ratios_are_taken_within_each_repeat(tmp_path):
    from research.distributed.distributed import ScalingSetup, arm_command, summarize
    arms = ScalingSetup(["--data", "digits"], [2], [0, 4], 2).arms()
    assert [a["name"] for a in arms] == ["1 process", "2 processes, B=0", "2 processes, B=4"]
    speeds = {0: [100.0, 150.0, 180.0], 1: [200.0, 300.0, 300.0]}
    rows = [{"repeat": r, "arm": a["name"], "images_per_s": v[i]}
            for r, v in speeds.items() for i, a in enumerate(arms)]
    s = {x["arm"]: x for x in summarize(rows, arms)}
    assert s["2 processes, B=0"]["ratio_to_1_process_per_repeat"] == [1.5, 1.5]
    assert s["2 processes, B=4"]["median_ratio_to_1_process"] == pytest.approx(1.65)
    single = arm_command(arms[0], ["--data", "digits"], tmp_path / "o")
    assert "torch.set_num_threads(1)" in single[2] and "--distributed" not in single
    two = arm_command(arms[2], ["--data", "digits"], tmp_path / "o")
    assert two[two.index("--nproc_per_node") + 1] == "2" and two[-2:] == ["--buffer-size", "4"]


@pytest.mark.slow
def test_bench_writes_results_for_every_arm(tmp_path):
    from research.distributed.distributed import ScalingSetup, run_benchmark
    args = [a for a in TINY if a not in ("--mode", "parallel", "--no-progress")]
    res = run_benchmark(ScalingSetup(args, [2], [0, 2], 1), tmp_path, loopback_env())
    assert [x["arm"] for x in res["summary"]] == ["1 process", "2 processes, B=0", "2 processes, B=2"]
    assert all(r["images_per_s"] > 0 and r["train_images"] == 2 * 400 for r in res["runs"])
    assert json.loads((tmp_path / "distributed-scaling.json").read_text())["summary"]
    assert not (tmp_path / "distributed-scaling.partial.json").exists()
