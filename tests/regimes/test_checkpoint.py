"""e2e and parallel runs checkpoint at every epoch and resume bit-identically."""
from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
import torch

from edgetrain.regimes import checkpoint as ck_mod
from edgetrain.regimes.schedule import resume, train
from tests.conftest import tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


class Killed(Exception):
    """Stands for SIGKILL at a chosen point of the checkpoint protocol."""


def weights(run_dir: Path) -> dict:
    return {p.name: load_file(str(p)) for p in sorted((run_dir / "modules").glob("*"))}


def assert_same_run(ref: Path, run: Path) -> None:
    a, b = weights(ref), weights(run)
    assert a.keys() == b.keys()  # no .next file left behind
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    strip = lambda m: {k: v for k, v in m.items() if k not in ("timings", "peak_rss_mib", "memory")}
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert strip(ma) == strip(mb)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    refs = {}

    def get(mode: str) -> Path:
        if mode not in refs:
            refs[mode] = tmp_path_factory.mktemp("ref") / mode
            train(tiny_cfg(mode=mode, epochs=3), refs[mode])
        return refs[mode]
    return get


def _kill_after_save(monkeypatch):
    orig = ck_mod.ResidentCheckpoint.save

    def save(self, trainers, next_epoch, **kw):
        orig(self, trainers, next_epoch, **kw)
        if next_epoch == 2:
            raise Killed
    monkeypatch.setattr(ck_mod.ResidentCheckpoint, "save", save)


def _kill_before_commit(monkeypatch):
    orig = ck_mod.atomic_write_json

    def write(path, obj, *args):
        if obj.get("cursor", {}).get("epoch") == 2:
            raise Killed  # the .next files exist, state.json still says epoch 1
        orig(path, obj, *args)
    monkeypatch.setattr(ck_mod, "atomic_write_json", write)


def _kill_before_promote(monkeypatch):
    orig = ck_mod.ResidentCheckpoint._write_state

    def write_state(self, epoch, finished, **kw):
        orig(self, epoch, finished, **kw)
        if epoch == 2 and not finished:
            raise Killed  # committed, but the .next files are not renamed yet
    monkeypatch.setattr(ck_mod.ResidentCheckpoint, "_write_state", write_state)


KILLS = {"after_save": _kill_after_save, "before_commit": _kill_before_commit,
         "before_promote": _kill_before_promote}


@pytest.mark.parametrize("mode", ["e2e", "parallel"])
@pytest.mark.parametrize("where", sorted(KILLS))
def test_killed_then_resumed_is_bit_identical(mode, where, tmp_path, reference, monkeypatch):
    run_dir = tmp_path / "run"
    KILLS[where](monkeypatch)
    with pytest.raises(Killed):
        train(tiny_cfg(mode=mode, epochs=3), run_dir)
    monkeypatch.undo()
    assert not (run_dir / "metrics.json").exists()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["cursor"]["epoch"] in (1, 2) and not state["finished"]
    resume(run_dir)
    assert_same_run(reference(mode), run_dir)
    assert json.loads((run_dir / "state.json").read_text())["finished"]


def test_sigkill_of_a_parallel_run_then_cli_resume(tmp_path, reference):
    run_dir = tmp_path / "run"
    args = ["--data", "digits", "--train-size", "400", "--model", "kmresnet", "--width", "8",
            "--depth", "4", "--modules", "2", "--epochs", "3", "--batch-size", "64",
            "--lr", "0.05", "--seed", "0", "--mode", "parallel", "--no-progress"]
    # the in-process reference's threads (tests/conftest.py): same threads, same sums
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.Popen([sys.executable, "-m", "edgetrain.cli", "train", *args, "--out",
                          str(run_dir)], cwd=ROOT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # kill once epoch 1 is checkpointed
        s = run_dir / "state.json"
        if s.is_file() and json.loads(s.read_text())["cursor"]["epoch"] >= 1:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    r = subprocess.run([sys.executable, "-m", "edgetrain.cli", "train", "--resume", str(run_dir),
                        "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same_run(reference("parallel"), run_dir)
