"""`edgetrain eval --plot` and `edgetrain status --plot-memory`: PNGs of a finished run,
and the checks that refuse a bad destination before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
import pytest

from edgetrain.cli import cli
from edgetrain.plots.run_plots import epoch_stretches

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plots") / "run"
    r = CliRunner().invoke(cli, ["train", "--width", "8", "--depth", "4", "-K", "2",
                                 "--epochs", "2", "--mode", "sequential", "--train-size", "300",
                                 "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_eval_plot_writes_a_png(run_dir, tmp_path):
    path = tmp_path / "acc.png"
    r = CliRunner().invoke(cli, ["eval", str(run_dir), "--plot", str(path)])
    assert r.exit_code == 0, r.output
    assert path.read_bytes()[:8] == PNG and f"wrote {path}" in r.output


@pytest.mark.parametrize("name", ["acc.jpg", "missing/acc.png"])
def test_eval_plot_refused_before_anything_is_written(run_dir, tmp_path, name):
    metrics = (run_dir / "metrics.json").read_text()
    r = CliRunner().invoke(cli, ["eval", str(run_dir), "--plot", str(tmp_path / name)])
    assert r.exit_code == 2 and "--plot" in r.output
    assert "depth" not in r.output  # nothing evaluated
    assert (run_dir / "metrics.json").read_text() == metrics
    assert list(tmp_path.iterdir()) == []


def test_status_plot_memory_writes_a_png(run_dir, tmp_path):
    path = tmp_path / "mem.png"
    r = CliRunner().invoke(cli, ["status", str(run_dir), "--plot-memory", str(path)])
    assert r.exit_code == 0, r.output
    assert path.read_bytes()[:8] == PNG


def test_status_plot_memory_without_a_log_is_one_line(run_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((run_dir / "config.json").read_text())
    r = CliRunner().invoke(cli, ["status", str(bare), "--plot-memory", str(tmp_path / "m.png")])
    assert r.exit_code == 2 and "no epoch logged" in r.output
    assert not (tmp_path / "m.png").exists()


def testepoch_stretches_group_consecutive_epochs_of_one_lap_and_module():
    lines = [{"lap": 0, "module": 0}, {"lap": 0, "module": 0}, {"lap": 0, "module": 1},
             {"lap": 1, "module": 0}, {"lap": 0, "module": [0, 1]}]
    assert epoch_stretches(lines) == [(1, 2, "lap 1, module 1"), (3, 3, "lap 1, module 2"),
                                 (4, 4, "lap 2, module 1"), (5, 5, "lap 1, module all")]


def test_log_lines_carry_the_fields_the_plot_reads(run_dir):
    line = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    assert {"lap", "module", "rss_mib", "peak_rss_mib"} <= set(line)
