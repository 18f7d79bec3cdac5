"""`edgetrain bench`: one command per measurement a user runs on their own device; research
studies are not among them (they live in research/)."""
from __future__ import annotations

from click.testing import CliRunner
import pytest

from edgetrain.cli import cli

USER_BENCHMARKS = {"memory", "cap", "speed", "floor", "plan-vs-measured", "fit-vs-measured",
                   "precision", "data-stream"}


def test_bench_lists_the_users_measurements_and_no_research():
    res = CliRunner().invoke(cli, ["bench", "--help"])
    assert res.exit_code == 0
    listed = {line.split()[0] for line in res.output.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == USER_BENCHMARKS


@pytest.mark.parametrize("args, msg", [
    (["plan-vs-measured", "--only", "99"], "--only takes indices"),
    (["data-stream", "--n", "2"], "--n must be >= 8"),
    (["floor", "--mode", "nope"], "Invalid value"),
    (["precision", "--parts", "auto,speed"], "--parts takes memory, accuracy and auto"),
])
def test_bench_user_errors_are_one_line(args, msg, tmp_path):
    res = CliRunner().invoke(cli, ["bench", *args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert msg in res.output and not (tmp_path / "out").exists()
