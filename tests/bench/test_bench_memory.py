"""`edgetrain bench memory` on a tiny configuration: fresh processes, valid JSON, every row."""
from __future__ import annotations

import json

from click.testing import CliRunner

from edgetrain.cli import cli


def test_bench_memory_tiny_writes_every_requested_row(tmp_path):
    out = tmp_path / "results"
    args = ["bench", "memory", "--model", "kmresnet", "--width", "4", "--depth", "2",
            "--input", "1x16x16", "--batch", "32", "--steps", "1", "--modules", "2",
            "--modes", "e2e", "sequential", "--no-vangl", "--recompute", "blocks",
            "--split", "memory", "--tag", "rc", "--out", str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["memory_kmresnet_1x16x16_b32_cpu-rc.json",
                     "memory_kmresnet_1x16x16_b32_cpu-rc.png"]
    res = json.loads((out / files[0]).read_text())
    assert res["split"] == "memory" and res["tag"] == "rc"
    assert [row["split"] for row in res["rows"]] == ["depth"] * 3 + ["memory"] * 2
    got = [(row["mode"], row["modules"], row["method"], row["recompute"]) for row in res["rows"]]
    # 2 blocks: sqrt checkpointing gives S = 1, K gives S = 2
    assert got == [("e2e", 1, "E2E", "none"), ("e2e", 1, "E2E+ckpt", "segments:1"),
                   ("e2e", 2, "E2E+ckpt", "segments:2"),
                   ("sequential", 2, "TRGL", "none"), ("sequential", 2, "TRGL", "blocks")]
    for row in res["rows"]:
        assert row["ok"], row["error"]
        assert row["measured_mib"] > 0 and row["predicted_mib"] > 0
        assert row["ratio_measured_predicted"] is not None
        assert row["import_rss_mib"] > 0 and row["phases_mib"]
    assert res["rows"][0]["saved_pct"] == 0.0
    assert res["rows"][0]["step_time_ratio"] is None  # e2e is the reference
    assert all(row["step_time_ratio"] > 0 for row in res["rows"][1:])
    assert res["rows"][3]["max_resident_modules"] == 1  # the out-of-core product path
    assert "saved%" in r.output and "sequential" in r.output


def test_bench_memory_bad_arguments_are_one_line_errors(tmp_path):
    r = CliRunner().invoke(cli, ["bench", "memory", "--modes", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error:") and len(r.output.splitlines()) == 1
    r = CliRunner().invoke(cli, ["bench", "memory", "--model", "kmresnet", "--depth", "2",
                                 "--modules", "9", "--input", "1x8x8", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--modules" in r.output and len(r.output.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
