"""Distributed runs checkpoint at every epoch boundary: one rank SIGKILLed mid-epoch, then
`train --resume` under torchrun, ends bit-identical to an uninterrupted 2-rank run (gloo,
loopback only)."""
import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from edgetrain.storage.codec import read_tensors
from edgetrain.storage.modules import module_path
from tests.regimes.test_distributed import free_port, loopback_env

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--data", "digits", "--train-size", "200", "--model", "kmresnet", "--width", "4",
        "--depth", "2", "--modules", "2", "--epochs", "3", "--batch-size", "32", "--seed", "0",
        "--mode", "parallel", "--device", "cpu", "--no-progress", "--distributed"]  # 7 steps/epoch


def torchrun(args: list[str], kill_rank: int = 0, kill_step: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "tests.regimes.dist_kill_driver", str(kill_rank), str(kill_step), "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=loopback_env(PYTHONPATH=str(ROOT)))


@pytest.mark.slow
def test_a_rank_killed_then_resumed_under_torchrun_is_bit_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    p = torchrun([*ARGS, "--out", str(ref)])
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun([*ARGS, "--out", str(run)], kill_rank=1, kill_step=10)  # mid epoch 2
    assert p.returncode != 0 and not (run / "metrics.json").exists()
    state = json.loads((run / "state.json").read_text())
    assert state["cursor"]["epoch"] == 1 and state["regime"] == "distributed"
    p = torchrun(["--resume", str(run), "--no-progress"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("best depth") == 1
    for k in range(2):
        a, b = read_tensors(module_path(ref, k)), read_tensors(module_path(run, k))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)
    ma, mb = (json.loads((d / "metrics.json").read_text())["modules"] for d in (ref, run))
    assert [m["steps"] for m in ma] == [m["steps"] for m in mb] == [21, 21]
    assert [m["test_acc"] for m in ma] == [m["test_acc"] for m in mb]
    assert not (run / "lock").exists()


def test_resume_of_a_distributed_run_without_torchrun_is_one_line(tmp_path):
    from click.testing import CliRunner
    from edgetrain.cli import cli
    from edgetrain.config import RunConfig
    (tmp_path / "r").mkdir()
    RunConfig(mode="parallel", distributed=True).save(tmp_path / "r" / "config.json")
    r = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "r")])
    assert r.exit_code == 2 and "under torchrun" in r.output and len(r.output.splitlines()) == 1
