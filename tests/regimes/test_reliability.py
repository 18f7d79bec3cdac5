"""Issue 19: inputs that used to get through (each refused before a run directory exists),
the run-directory lock, and out-of-memory as one line (under RLIMIT_AS in a child)."""
from __future__ import annotations

import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys

from click.testing import CliRunner
import pytest

from edgetrain.cli import cli
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.regimes.schedule import resume, train
from edgetrain.storage.lock import FileLock, Held
from tests.conftest import tiny_cfg
from tests.cli.test_bad_inputs import check_one_line_exit_2

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--train-size", "100", "--width", "4", "--depth", "2", "--modules", "2", "--epochs", "2",
        "--no-progress"]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


REPORTED = [  # the cases of the issue, and their neighbours
    (["--val-fraction", "0.9999"], "training sample"),
    (["--val-fraction", "0.0001", "--train-size", "100"], "no validation sample"),
    (["--mode", "sequential", "--cache-dir", "/etc/hostname"], "is a file, not a folder"),
    (["--mode", "sequential", "--cache-dir", "/etc/hostname/sub"], "is not a folder"),
    (["--tau", "inf"], "--tau must be a finite number"),
    (["--tau", "nan"], "--tau must be a finite number"),
    (["--lr", "-inf"], "--lr must be a finite number"),
    (["--mult-h", "nan", "--tau-schedule", "multipliers"], "--mult-h must be a finite"),
    (["--prefetch-mib", "inf"], "--prefetch-mib must be a finite"),
    (["--init-gain", "nan"], "--init-gain must be a finite"),
    (["--data", "synthetic", "--input", "1x8x8", "--synthetic-size", "20", "--train-size", "3"],
     "has no training sample"),
]


@pytest.mark.parametrize("args,needle", REPORTED, ids=[" ".join(a) for a, _ in REPORTED])
def test_reported_inputs_are_refused_before_the_run_directory_exists(args, needle, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", *TINY, *args, "--out", str(out)])
    check_one_line_exit_2(r, needle)
    assert not out.exists(), "a refused configuration left a run directory"


def test_cache_dir_under_a_read_only_folder_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    r = CliRunner().invoke(cli, ["train", *TINY, "--mode", "sequential", "--cache-dir",
                                 str(ro / "c"), "--out", str(tmp_path / "run")])
    check_one_line_exit_2(r, "cannot be created")


def test_cache_dir_that_can_be_created_is_accepted_and_not_created_early(tmp_path):
    from edgetrain.storage.cache import check_cache_dir
    check_cache_dir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("field,value", [("epochs", "3"), ("augment", 1), ("lr", "0.1"),
                                         ("input_shape", [3, "a", 3]), ("cache_dir", 5),
                                         ("tau", float("inf")), ("seed", 1.5)])
def test_config_json_with_wrong_types_is_a_user_error(field, value):
    with pytest.raises(UserError, match="must be"):
        RunConfig.from_dict({field: value})


# ------------------------------------------------------------------------------ the lock
HOLD = ("import sys, time; from edgetrain.storage.lock import lock_run_dir; "
        "lock_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(120)")


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                         text=True, env=child_env(), cwd=ROOT)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lock") / "run"
    train(tiny_cfg(mode="e2e", epochs=1, train_size=100, width=4, depth=2), out)
    return out


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    p = _holder(run_dir)
    try:
        for args in (["train", "--resume", str(run_dir)], ["train", *TINY, "--out", str(run_dir)]):
            r = CliRunner().invoke(cli, args)
            check_one_line_exit_2(r, f"in use by process {p.pid}")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (run_dir / "lock").read_text().strip() == str(p.pid)  # left behind by the dead
    resume(run_dir)  # taken over: the finished run's metrics come back
    assert not (run_dir / "lock").exists()  # released at the end


def test_a_fresh_out_held_by_another_process_is_refused(tmp_path):
    out = tmp_path / "fresh"
    out.mkdir()
    p = _holder(out)
    try:
        r = CliRunner().invoke(cli, ["train", *TINY, "--out", str(out)])
        check_one_line_exit_2(r, str(p.pid))
        assert not (out / "config.json").exists()
    finally:
        p.kill()
        p.wait()


def test_a_waiting_writer_gets_the_lock_when_the_holder_ends(tmp_path):
    path = tmp_path / "pack.lock"
    p = _holder_file(path)
    with pytest.raises(Held) as e:
        FileLock(path).acquire(wait=False)
    assert e.value.pid == p.pid
    p.kill()
    p.wait()
    lock = FileLock(path).acquire(wait=True)  # returns once the holder is gone
    assert path.read_text().strip() == str(os.getpid())
    lock.release()
    assert not path.exists()


def _holder_file(path: Path) -> subprocess.Popen:
    code = ("import sys, time; from edgetrain.storage.lock import FileLock; "
            "FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                         text=True, env=child_env(), cwd=ROOT)
    assert p.stdout.readline().strip() == "held"
    return p


# ------------------------------------------------------------------------- out of memory
CAPPED = """
import resource, sys
import torch  # the runtime first: the cap is set above what the imports took
from edgetrain.cli import main
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
cap = vm_bytes() + 400 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
main(sys.argv[1:])
"""
OOM_ARGS = ["--data", "synthetic", "--input", "3x64x64", "--synthetic-size", "80",
            "--model", "resnet20", "--batch-size", "64", "--epochs", "1", "--no-augment",
            "--device", "cpu", "--no-progress"]


def test_out_of_memory_is_one_line_naming_phase_memory_and_plan_then_resumes(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", CAPPED, "train", *OOM_ARGS, "--mode", "e2e",
                        "--out", str(out)], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    err = p.stderr.strip()
    assert p.returncode == 2, err[-3000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: out of memory in phase train (the whole network) (e2e)"), err
    assert "MiB (peak resident memory)" in err
    assert "edgetrain plan --memory-budget" in err and "--model resnet20" in err
    assert f"edgetrain train --resume {out}" in err
    metrics = resume(out)  # without the cap, the run continues from its last checkpoint
    assert (out / "metrics.json").is_file() and metrics["modules"][0]["steps"] == 2
