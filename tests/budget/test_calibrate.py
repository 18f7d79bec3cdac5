"""`edgetrain devices calibrate NAME` measures this machine and writes a profile that
`edgetrain devices` lists and the validator accepts, keeping the source of every figure."""
from __future__ import annotations

from pathlib import Path
import shutil

from click.testing import CliRunner
import pytest

from edgetrain.budget import calibrate, devices
from edgetrain.budget.devices import DEVICES_DIR, read_profile
from edgetrain.cli import cli


@pytest.fixture
def devdir(tmp_path, monkeypatch):
    """The user's profiles directory (where calibrate writes), empty."""
    d = tmp_path / "devices"
    d.mkdir()
    monkeypatch.setenv(devices.DEVICES_ENV, str(d))
    return d


def test_calibrate_writes_a_listed_profile(devdir, tmp_path):
    cache = tmp_path / "cache"
    res = CliRunner().invoke(cli, ["devices", "calibrate", "my-box", "--cache-dir", str(cache),
                                   "--storage-mib", "8"])
    assert res.exit_code == 0, res.output
    p = read_profile(devdir / "my-box.toml")
    assert p.storage_write_mib_s > 0 and p.storage_read_mib_s > 0 and p.cpu_cores >= 1
    assert p.runtime_baseline_mib > 50 and isinstance(p.bf16, bool) and isinstance(p.fp16, bool)
    assert 0 < p.reserved_mib < p.total_memory_mib and p.budget_bytes > 0
    measured = {"total_memory_mib", "reserved_mib", "runtime_baseline_mib", "storage_write_mib_s",
                "storage_read_mib_s", "bf16", "fp16", "cpu_cores"}
    assert set(p.measured) == measured and not p.estimated  # a source for every figure
    assert all("edgetrain devices calibrate" in v for v in p.measured.values())
    assert not list(cache.iterdir())  # the probe file is gone
    res = CliRunner().invoke(cli, ["devices"])
    assert res.exit_code == 0 and "my-box" in res.output


def test_calibrate_updates_keeping_published_figures(devdir, tmp_path, monkeypatch):
    """An existing profile of this machine's size keeps its published size and sources; a
    profile of another size is not this device: one line, exit 2, file unchanged."""
    total = calibrate.memory_mib()[0]
    text = (DEVICES_DIR / "raspberry-pi-5-8gb.toml").read_text()
    (devdir / "box.toml").write_text(text.replace('"raspberry-pi-5-8gb"', '"box"')
                                     .replace("total_memory_mib = 8192", f"total_memory_mib = {total}"))
    before = read_profile(devdir / "box.toml")
    monkeypatch.setattr(calibrate, "runtime_rss_bytes",  # the baseline probe is tested above
                        lambda: {"import_rss_bytes": 500 * 2**20, "warm_rss_bytes": 680 * 2**20})
    calibrate.calibrate("box", tmp_path / "cache", storage_mib=4)
    after = read_profile(devdir / "box.toml")
    assert after.total_memory_mib == total and after.sources == before.sources
    assert after.notes == before.notes and after.runtime_baseline_mib == 680.0
    assert "storage_read_mib_s" not in after.estimated and "storage_read_mib_s" in after.measured
    shutil.copy(DEVICES_DIR / "cpu-2gb.toml", devdir / "cpu-2gb.toml")
    old = (devdir / "cpu-2gb.toml").read_text()
    if abs(total - 2048) / 2048 > calibrate.TOTAL_TOLERANCE:
        res = CliRunner().invoke(cli, ["devices", "calibrate", "cpu-2gb", "--storage-mib", "4",
                                       "--cache-dir", str(tmp_path / "cache")])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
        assert "calibrate cpu-2gb on that device" in res.output
        assert (devdir / "cpu-2gb.toml").read_text() == old


def test_calibrate_bad_name_is_one_line(devdir):
    res = CliRunner().invoke(cli, ["devices", "calibrate", "Bad Name"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1


def test_user_profiles_dir_follows_the_environment(tmp_path):
    home = str(Path("~").expanduser())
    assert devices.user_devices_dir({}) == Path(home) / ".config" / "edgetrain" / "devices"
    assert devices.user_devices_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == \
        tmp_path / "edgetrain" / "devices"
    assert devices.user_devices_dir({"XDG_CONFIG_HOME": "/x",
                                     devices.DEVICES_ENV: str(tmp_path)}) == tmp_path


def test_calibrating_a_shipped_name_writes_a_user_copy_that_wins(devdir, tmp_path, monkeypatch):
    """Calibrating a shipped profile starts from its published figures, writes the user's
    directory (never the shipped one), and the listing says the user copy overrides it."""
    shipped = read_profile(DEVICES_DIR / "cpu-2gb.toml")
    before = (DEVICES_DIR / "cpu-2gb.toml").read_text()
    monkeypatch.setattr(calibrate, "memory_mib", lambda: (2048, 300))  # this box is 2 GiB
    monkeypatch.setattr(calibrate, "runtime_rss_bytes",
                        lambda: {"import_rss_bytes": 500 * 2**20, "warm_rss_bytes": 640 * 2**20})
    p, path = calibrate.calibrate("cpu-2gb", tmp_path / "cache", storage_mib=4)
    assert path == devdir / "cpu-2gb.toml" and (DEVICES_DIR / "cpu-2gb.toml").read_text() == before
    assert p.notes == shipped.notes and p.runtime_baseline_mib == 640.0
    assert devices.load_profile("cpu-2gb").runtime_baseline_mib == 640.0  # the user copy wins
    res = CliRunner().invoke(cli, ["devices"])
    rows = {line.split()[0]: line for line in res.output.splitlines()[1:]}
    assert res.exit_code == 0 and rows["cpu-2gb"].endswith("user (overrides shipped)")
    assert rows["raspberry-pi-4-4gb"].endswith("shipped")
    assert len(rows) == len(list(DEVICES_DIR.glob("*.toml")))
