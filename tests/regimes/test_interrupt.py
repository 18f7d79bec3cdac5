"""Ctrl-C and SIGTERM: a run stops at the next step boundary with a mid-epoch checkpoint and
exit 130 / 143; resumed, it ends bit-identical to a run never interrupted (every regime).
A second signal exits at once and the last checkpoint still resumes bit-identically."""
from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

from click.testing import CliRunner
import pytest
import torch

from edgetrain.cli import cli
from edgetrain.storage.codec import read_tensors

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--data", "digits", "--train-size", "200", "--model", "kmresnet", "--width", "4",
        "--depth", "2", "--modules", "2", "--epochs", "2", "--laps", "2", "--batch-size", "32",
        "--seed", "0", "--device", "cpu", "--no-progress"]  # 7 steps per epoch and module


def run_cli(args: list[str]):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    made = {}

    def get(mode: str) -> Path:
        if mode not in made:
            made[mode] = tmp_path_factory.mktemp("ref") / mode
            run_cli(["train", *ARGS, "--mode", mode, "--out", str(made[mode])])
        return made[mode]
    return get


def interrupted(run_dir: Path, mode: str, step: int, signals: list[int]) -> subprocess.CompletedProcess:
    """Start the run, send `signals` before its training step `step`, let it go on."""
    # the in-process reference's threads (tests/conftest.py), whatever OMP_NUM_THREADS says
    # outside: same threads, same sums
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.Popen([sys.executable, "-m", "tests.regimes.interrupt_driver", str(step), "train",
                          *ARGS, "--mode", mode, "--out", str(run_dir)], cwd=ROOT, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    for s in signals:
        p.send_signal(s)
        time.sleep(0.3)  # the handler has run before the next one arrives
    out, err = p.communicate("go\n", timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def assert_same(a: Path, b: Path) -> None:
    fa = sorted(f.name for f in (a / "modules").glob("*.safetensors"))
    assert fa and fa == sorted(f.name for f in (b / "modules").glob("*.safetensors"))
    for f in fa:
        ta, tb = read_tensors(a / "modules" / f), read_tensors(b / "modules" / f)
        assert ta.keys() == tb.keys()
        for n in ta:
            assert torch.equal(ta[n], tb[n]), (f, n)
    ma, mb = (json.loads((d / "metrics.json").read_text())["modules"] for d in (a, b))
    for x, y in zip(ma, mb):  # the interrupted epoch's running sums were restored too
        assert (x["train_loss"], x["test_acc"], x["steps"]) == (y["train_loss"], y["test_acc"],
                                                                y["steps"])


# step 11 is mid-epoch 2 of module 1 (or of the run), step 17 mid-epoch of module 2's lap
@pytest.mark.parametrize("mode,step,sig", [
    ("e2e", 4, signal.SIGTERM), ("sequential", 11, signal.SIGINT),
    pytest.param("parallel", 11, signal.SIGINT, marks=pytest.mark.slow),  # ~45 s each here
    pytest.param("multilap", 17, signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_mid_epoch_then_resume_is_bit_identical(mode, step, sig, tmp_path, reference):
    run_dir = tmp_path / "run"
    p = interrupted(run_dir, mode, step, [sig])
    assert p.returncode == 128 + sig, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"edgetrain train --resume {run_dir}" in last, last
    assert "Traceback" not in p.stderr
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "lock").exists()
    state = json.loads((run_dir / "state.json").read_text())
    if mode in ("e2e", "parallel"):
        assert state["cursor"]["position"] > 0  # a mid-epoch checkpoint
    else:
        k = state["cursor"]["module"]
        meta = json.loads(read_meta_progress(run_dir, k))
        assert meta["position"] > 0, meta
    run_cli(["train", "--resume", str(run_dir), "--no-progress"])
    assert_same(reference(mode), run_dir)


def read_meta_progress(run_dir: Path, k: int) -> str:
    from edgetrain.storage.codec import read_meta  # only the out-of-core cases read it
    return read_meta(run_dir / "modules" / f"{k:02d}.safetensors")["progress"]


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_the_last_checkpoint_resumes(tmp_path, reference):
    run_dir = tmp_path / "run"
    p = interrupted(run_dir, "sequential", 11, [signal.SIGINT, signal.SIGINT])
    assert p.returncode == 130, p.stderr[-2000:]
    assert "again: exiting now" in p.stderr and "Traceback" not in p.stderr
    run_cli(["train", "--resume", str(run_dir), "--no-progress"])
    assert_same(reference("sequential"), run_dir)
