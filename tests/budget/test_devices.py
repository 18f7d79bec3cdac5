"""Device profiles, budget parsing, the RSS watchdog and the `devices` / `train` budget options."""
from __future__ import annotations

import json
from pathlib import Path
import re
import shutil

from click.testing import CliRunner
import pytest

from edgetrain.budget import devices
from edgetrain.budget import guard as budget
from edgetrain.budget.devices import (DEVICES_DIR, OPTIONAL_FIELDS, PROFILE_FIELDS, load_profile,
                                      read_profile)
from edgetrain.budget.guard import MemoryBudgetExceeded, RssWatchdog
from edgetrain.cli import cli
from edgetrain.config import CACHE_DTYPES
from edgetrain.errors import UserError
from edgetrain.units import MIB, parse_size

PROFILE_FILES = sorted(DEVICES_DIR.glob("*.toml"))
REQUIRED = {"jetson-nano-4gb", "jetson-orin-nano-8gb", "jetson-agx-orin-32gb",
            "raspberry-pi-4-4gb", "raspberry-pi-5-8gb", "cpu-2gb"}


def test_required_profiles_present():
    assert REQUIRED <= {p.stem for p in PROFILE_FILES}


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_profile_fields(path: Path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    raw = tomllib.loads(path.read_text())
    assert set(PROFILE_FIELDS) <= set(raw) <= set(PROFILE_FIELDS) | set(OPTIONAL_FIELDS)  # none unknown
    p = read_profile(path)
    assert p.name == path.stem
    assert p.description and p.accelerator_name and p.storage and len(p.notes) > 40
    # memory: plausible board sizes, the OS reservation a minority of it
    assert p.total_memory_mib in (2048, 4096, 8192, 16384, 32768, 65536)
    assert 128 <= p.reserved_mib <= p.total_memory_mib // 2
    assert p.budget_bytes == (p.total_memory_mib - p.reserved_mib) * MIB
    assert isinstance(p.shared_cpu_gpu_memory, bool)
    if p.accelerator == "cuda":  # every CUDA profile here is a Jetson: one shared DRAM
        assert p.name.startswith("jetson") and p.shared_cpu_gpu_memory
    assert p.accelerator in ("none", "cuda")
    assert p.train_device == ("cuda" if p.accelerator == "cuda" else "cpu")
    # storage: between a slow SD card and a fast NVMe drive
    assert 10 <= p.storage_write_mib_s <= p.storage_read_mib_s * 1.01 <= 8000
    assert p.cache_dtype in CACHE_DTYPES
    assert "reserved_mib" in p.estimated  # the OS share is always an estimate: say so
    assert all(s.startswith("https://") for s in p.sources)
    if p.name != "cpu-2gb":  # a real product cites its published figures
        assert p.sources


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _good_text(name: str = "tiny") -> str:
    return (DEVICES_DIR / "cpu-2gb.toml").read_text().replace('"cpu-2gb"', f'"{name}"')


def test_copy_of_profile_loads_from_other_root(tmp_path):
    _write(tmp_path, "tiny", _good_text())
    assert load_profile("tiny", tmp_path).total_memory_mib == 2048


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("total_memory_mib = 2048", "total_memory_mib = [2048"), "malformed"),
    (lambda t: t.replace('accelerator = "none"', 'accelerator = "tpu"'), "accelerator"),
    (lambda t: t.replace('cache_dtype = "float16"', 'cache_dtype = "int8"'), "cache_dtype"),
    (lambda t: t.replace("reserved_mib = 256", "reserved_mib = 4096"), "reserved_mib"),
    (lambda t: t.replace("total_memory_mib = 2048", 'total_memory_mib = "2G"'), "must be int"),
    (lambda t: t.replace("shared_cpu_gpu_memory = false", "shared_cpu_gpu_memory = 0"), "bool"),
    (lambda t: t.replace("reserved_mib = 256", "reserved_mib = true"), "must be int"),
    (lambda t: t.replace('name = "tiny"', 'name = "other"'), "file name"),
    (lambda t: t + "\ncolour = 'red'\n", "unknown fields"),
    (lambda t: re.sub(r"(?m)^storage_read_mib_s.*$", "", t), "missing fields"),
])
def test_bad_profile_is_one_user_error(tmp_path, edit, match):
    _write(tmp_path, "tiny", edit(_good_text()))
    with pytest.raises(UserError, match=match) as e:
        load_profile("tiny", tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["nope", "../devices/cpu-2gb", "CPU-2GB", ""])
def test_unknown_profile(name):
    with pytest.raises(UserError, match="unknown device profile"):
        load_profile(name)


@pytest.mark.parametrize("text, n", [("1.5GiB", 3 * 2**29), ("800MB", 800 * 10**6),
                                     ("2g", 2 * 2**30), ("512 MiB", 512 * MIB), ("1024", 1024),
                                     ("0.5 GB", 5 * 10**8)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "0", "-1G", "1.5 parsecs", "GiB", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError, match="--memory-budget"):
        parse_size(text)


def test_watchdog_trips_only_above_budget():
    with RssWatchdog(1 << 50) as wd:
        wd.check()  # far above: never trips
    assert wd.peak_bytes > 10 * MIB
    with RssWatchdog(wd.peak_bytes // 4, interval_s=0.01) as low:
        with pytest.raises(MemoryBudgetExceeded, match="over the memory budget"):
            low.check()
    assert low.over_bytes > low.budget_bytes


def test_apply_budget_options():
    opts = budget.apply_budget_options({}, "cpu-2gb", None)
    assert opts["memory_budget"] == load_profile("cpu-2gb").budget_bytes
    assert opts["device_profile"] == "cpu-2gb" and opts["shared_cpu_gpu_memory"] is False
    assert budget.apply_budget_options({}, None, "1GiB")["memory_budget"] == 2**30
    with pytest.raises(UserError, match="not both"):
        budget.apply_budget_options({}, "cpu-2gb", "1GiB")


def test_devices_command_lists_every_profile():
    res = CliRunner().invoke(cli, ["devices"])
    assert res.exit_code == 0, res.output
    for p in PROFILE_FILES:
        assert p.stem in res.output


@pytest.fixture
def small_runtime(monkeypatch):
    """A runtime baseline of 100 MiB, so budget checks do not depend on this machine."""
    from edgetrain.budget import planner
    for mod in (budget, planner):  # the guard's and the planner's reference
        monkeypatch.setattr(mod, "runtime_baseline_bytes", lambda: 100 * MIB)


@pytest.mark.parametrize("args, match", [
    (["--device-profile", "no-such-board"], "unknown device profile"),
    (["--memory-budget", "lots"], "--memory-budget must be"),
    (["--memory-budget", "10MiB"], "below the runtime itself"),
    (["--memory-budget", "1GiB", "--device-profile", "cpu-2gb"], "not both"),
])
def test_train_budget_errors_one_line(tmp_path, small_runtime, args, match):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--out", str(out), "--no-progress", *args])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and re.search(match, lines[0]), res.output
    assert not (out / "config.json").exists()


def test_malformed_profile_via_cli(tmp_path, monkeypatch):
    shutil.copy(DEVICES_DIR / "cpu-2gb.toml", tmp_path / "cpu-2gb.toml")
    (tmp_path / "broken.toml").write_text("name = 'broken'\ntotal_memory_mib = \n")
    monkeypatch.setattr(devices, "DEVICES_DIR", tmp_path)
    res = CliRunner().invoke(cli, ["train", "--device-profile", "broken"])
    assert res.exit_code == 2 and "malformed device profile" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["devices"])
    assert res.exit_code == 2 and "malformed" in res.output


def test_watchdog_stops_run_cleanly_and_keeps_run_dir(tmp_path, tiny, small_runtime, monkeypatch):
    """A budget the process exceeds stops training at a step boundary with a one-line error;
    config.json stays for `--resume` (the pre-flight check is bypassed to reach the watchdog)."""
    import edgetrain.regimes.schedule as schedule
    monkeypatch.setattr(schedule, "check_fits", lambda *a, **k: None)
    cfg = tiny(memory_budget=150 * MIB)  # this process is far above 150 MiB after torch
    with pytest.raises(MemoryBudgetExceeded, match="over the memory budget"):
        schedule.train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["memory_budget"] == 150 * MIB
    assert not (tmp_path / "run" / "metrics.json").exists()


class _TripAfter:
    """A watchdog stand-in that reports an overrun after `n` optimiser steps."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def check(self) -> None:
        self.calls += 1
        if self.calls > self.n:
            raise MemoryBudgetExceeded("stopped: over the memory budget (test)")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def test_budget_stop_leaves_run_resumable(tmp_path, tiny, monkeypatch):
    """A budget stop in the middle of multilap training, then `resume`: the same accuracies
    as a run that was never stopped."""
    import edgetrain.regimes.schedule as schedule
    monkeypatch.setattr(schedule, "check_fits", lambda *a, **k: None)
    cfg = lambda: tiny(mode="multilap", memory_budget=64 * 2**30)  # noqa: E731
    monkeypatch.setattr(budget, "watchdog_for", lambda c, device="cpu": _TripAfter(9))
    with pytest.raises(MemoryBudgetExceeded):
        schedule.train(cfg(), tmp_path / "stopped")
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    monkeypatch.setattr(budget, "watchdog_for", lambda c, device="cpu": None)
    resumed = schedule.resume(tmp_path / "stopped")
    fresh = schedule.train(cfg(), tmp_path / "fresh")
    assert ([m["test_acc"] for m in resumed["modules"]]
            == [m["test_acc"] for m in fresh["modules"]])
    assert resumed["modules"][-1]["steps"] == fresh["modules"][-1]["steps"]
