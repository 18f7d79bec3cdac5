"""The allocator policy, the default thread count, and the speed benchmarks' small parts."""
import os
import subprocess
import sys

import pytest
import torch

from edgetrain import measure
from edgetrain.units import MIB


@pytest.mark.parametrize("spec,expect", [("system", None), ("compact", MIB),
                                         ("mmap:4", 4 * MIB), ("mmap:0.5", MIB // 2),
                                         ("mmap:32", 32 * MIB)])
def test_malloc_policies_parse(spec, expect):
    assert measure.parse_malloc_policy(spec) == expect


@pytest.mark.parametrize("spec", ["", "fast", "mmap", "mmap:", "mmap:0", "mmap:33", "mmap:x",
                                  "brk:4"])
def test_bad_malloc_policies_are_refused(spec):
    with pytest.raises(ValueError, match="EDGETRAIN_MALLOC"):
        measure.parse_malloc_policy(spec)


def test_auto_compacts_only_under_a_memory_budget():
    assert measure.resolve_malloc_policy("auto", True) == "compact"
    assert measure.resolve_malloc_policy("auto", False) == "system"
    assert measure.resolve_malloc_policy("mmap:8", True) == "mmap:8"  # the user's choice wins
    with pytest.raises(ValueError):
        measure.resolve_malloc_policy("mmap:64", False)


def test_a_bad_malloc_policy_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "EDGETRAIN_MALLOC": "mmap:99"}
    p = subprocess.run([sys.executable, "-m", "edgetrain.cli", "train", "--out",
                        str(tmp_path / "r")], env=env, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["error: EDGETRAIN_MALLOC='mmap:99': use auto, "
                                             "system, compact or mmap:N (N MiB, 0 < N <= 32)"]
    assert not (tmp_path / "r").exists()


def test_usable_cores_follows_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    real_open = open

    def fake_open(path, *a, **kw):
        if path == "/sys/fs/cgroup/cpu.max":
            from io import StringIO  # a fake cgroup file
            return StringIO(quota)
        return real_open(path, *a, **kw)
    monkeypatch.setattr("builtins.open", fake_open)
    for quota, expect in [("max 100000\n", 8), ("150000 100000\n", 2), ("50000 100000\n", 1),
                          ("800000 100000\n", 8), ("garbage\n", 8)]:
        assert measure.usable_cores() == expect, quota


def test_default_threads_lowers_torch_to_the_usable_cores_unless_the_user_chose(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        monkeypatch.setattr(measure, "usable_cores", lambda: 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert measure.default_threads() is None and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert measure.default_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(measure, "usable_cores", lambda: 4)
        assert measure.default_threads() is None and torch.get_num_threads() == 1  # never raised
    finally:
        torch.set_num_threads(before)
