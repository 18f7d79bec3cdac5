"""Crash safety: SIGKILL at random moments then resume gives bit-identical weights; disk
full; NaN loss; corrupt caches (see also test_cache and test_scheduler)."""
import errno
from pathlib import Path
import random
import signal
import subprocess
import sys

import pytest
import torch

from edgetrain.errors import UserError
from edgetrain.method.loop import NonFiniteLoss
from edgetrain.method.stage import Stage
from edgetrain.regimes.schedule import resume, train
from edgetrain.storage import atomic as store_mod
from edgetrain.storage.codec import read_tensors
from tests.regimes.fault_driver import fault_cfg

ROOT = Path(__file__).resolve().parents[2]
KILL_POINTS = [("shard-", "mid"), ("modules/", "mid"), ("state.json", "after"),
               ("manifest.json", "before"), ("modules/", "after"), ("state.json", "mid")]


def _weights(run_dir: Path) -> dict:
    return {f.name: read_tensors(f) for f in sorted((run_dir / "modules").glob("*.safetensors"))}


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for f in wa:
        assert wa[f].keys() == wb[f].keys()
        for n in wa[f]:
            assert torch.equal(wa[f][n], wb[f][n]), (f, n)


def _killed_then_resumed(run_dir: Path, mode: str, pattern: str, n: int, phase: str) -> int:
    p = subprocess.run([sys.executable, "-m", "tests.regimes.fault_driver", str(run_dir), mode, pattern,
                        str(n), phase], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if p.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(p.stderr[-2000:])
    if (run_dir / "config.json").exists():
        resume(run_dir)
    else:  # killed before the run directory held a config: start again
        train(fault_cfg(mode), run_dir)
    return p.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per mode, shared by the tests of this file."""
    made = {}

    def get(mode: str) -> Path:
        if mode not in made:
            made[mode] = tmp_path_factory.mktemp("ref") / mode
            train(fault_cfg(mode), made[mode])
        return made[mode]
    return get


def _kill_loop(tmp_path, ref, mode, points, seed):
    rng = random.Random(seed)
    killed = 0
    for i, (pattern, phase) in enumerate(points):
        run_dir = tmp_path / f"k{i}"
        n = rng.randint(1, 4)
        killed += _killed_then_resumed(run_dir, mode, pattern, n, phase) == -signal.SIGKILL
        _assert_same(ref, run_dir)
        assert (run_dir / "metrics.json").is_file()
    assert killed >= len(points) - 1  # the kill points are reached (not a test of nothing)
    return killed


@pytest.mark.parametrize("mode,points", [("sequential", KILL_POINTS[:1]),
                                         ("multilap", KILL_POINTS[1:2])])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, reference, mode,
                                                                  points):
    killed = _kill_loop(tmp_path, reference(mode), mode, points, seed=len(mode))
    assert killed >= 1  # at least one run really died mid-way and was resumed bit-identically


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "multilap"])
def test_sigkill_loop_long(tmp_path, reference, mode):
    ref, rng = reference(mode), random.Random(99)
    _kill_loop(tmp_path, ref, mode, KILL_POINTS * 2, seed=1234)
    for i in range(3):  # kills by timing, wherever the run happens to be
        run_dir = tmp_path / f"t{i}"
        p = subprocess.Popen([sys.executable, "-m", "tests.regimes.fault_driver", str(run_dir), mode,
                              "never", "1", "after"], cwd=ROOT)
        try:
            p.wait(timeout=rng.uniform(3.0, 12.0))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        resume(run_dir) if (run_dir / "config.json").exists() else train(fault_cfg(mode), run_dir)
        _assert_same(ref, run_dir)


def test_disk_full_mid_run_then_resume_is_bit_identical(tmp_path, reference, monkeypatch):
    ref, run_dir = reference("sequential"), tmp_path / "r"
    orig, seen = store_mod.atomic_write, [0]

    def full_on_third_shard(path, write, *args):
        if "shard-" in str(path):
            seen[0] += 1
            if seen[0] == 3:
                return orig(path, lambda f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")),
                            *args)
        return orig(path, write, *args)

    monkeypatch.setattr(store_mod, "atomic_write", full_on_third_shard)
    with pytest.raises(UserError, match="no space left"):
        train(fault_cfg("sequential"), run_dir)
    monkeypatch.setattr(store_mod, "atomic_write", orig)  # space freed
    assert not list(run_dir.rglob(".*.tmp"))
    resume(run_dir)
    _assert_same(ref, run_dir)


def test_nan_loss_names_module_lap_epoch_step_and_keeps_the_checkpoint(tmp_path, reference,
                                                                      monkeypatch):
    cfg = fault_cfg("multilap")
    calls = [0]
    real = Stage.forward_transport

    def poisoned(self, x, scaling="mean"):
        z, w = real(self, x, scaling)
        if x.is_meta:  # a memory prediction, not a training step
            return z, w
        calls[0] += 1
        return z, (w * float("nan") if calls[0] == 9 else w)  # 4 steps per epoch: lap 2 module 1

    monkeypatch.setattr(Stage, "forward_transport", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"module 1/2, lap 2/2, epoch 2: non-finite loss "
                                            r"\(nan\) at step 5"):
        train(cfg, tmp_path / "r")
    monkeypatch.setattr(Stage, "forward_transport", real)
    resume(tmp_path / "r")  # the last good checkpoint is intact and resumable
    _assert_same(reference("multilap"), tmp_path / "r")
