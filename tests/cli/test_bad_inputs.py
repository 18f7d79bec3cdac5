"""A table of bad inputs: each must exit with code 2, one line on stderr, no traceback,
and leave no half-written run directory behind."""
from __future__ import annotations

import json
from pathlib import Path
import shutil

from click.testing import CliRunner
import pytest

from edgetrain.cli import cli
from edgetrain.regimes.schedule import train
from tests.conftest import tiny_cfg


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "run"
    train(tiny_cfg(mode="sequential", epochs=1, train_size=200), out)
    return out


def corrupt(good: Path, tmp: Path, how: str) -> Path:
    """Copy the good run and break it in one way."""
    d = tmp / "bad"
    shutil.copytree(good, d)
    if how == "no-config":
        (d / "config.json").unlink()
    elif how == "config-not-json":
        (d / "config.json").write_text("{not json")
    elif how == "config-unknown-key":
        c = json.loads((d / "config.json").read_text())
        c["bogus"] = 1
        (d / "config.json").write_text(json.dumps(c))
    elif how == "config-bad-value":
        c = json.loads((d / "config.json").read_text())
        c["modules"] = -3
        (d / "config.json").write_text(json.dumps(c))
    elif how == "config-list":
        (d / "config.json").write_text("[1, 2]")
    elif how == "module-missing":
        (d / "modules" / "01.safetensors").unlink()
    elif how == "module-garbage":
        (d / "modules" / "00.safetensors").write_bytes(b"\x00garbage" * 10)
    elif how == "module-truncated":
        p = d / "modules" / "00.safetensors"
        p.write_bytes(p.read_bytes()[:100])
    elif how == "module-wrong-shape":
        c = json.loads((d / "config.json").read_text())
        c["width"] = 16
        (d / "config.json").write_text(json.dumps(c))
    return d


TRAIN_BAD = [
    (["--model", "nope"], "unknown model"),
    (["--data", "nope"], "unknown dataset"),
    (["--modules", "0"], "--modules"),
    (["--modules", "99"], "--modules"),
    (["--tau", "0"], "--tau"),
    (["--tau", "-2"], "--tau"),
    (["--mode", "multilap", "--epochs", "5", "--laps", "2"], "--laps"),
    (["--laps", "0"], "--laps"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "abc"], "epochs"),
    (["--train-size", "100000"], "--train-size"),
    (["--train-size", "0"], "--train-size"),
    (["--mode", "bogus"], "--mode"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--momentum", "1"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--width", "0"], "--width"),
    (["--depth", "21", "--model", "resnet20"], "6m + 2"),
    (["--cache-views", "0"], "--cache-views"),
    (["--prefetch-mib", "0"], "--prefetch-mib"),
    (["--cache-dtype", "int8"], "--cache-dtype"),
    (["--input", "3x32"], "--input"),
    (["--input", "axbxc", "--data", "synthetic"], "--input"),
    (["--input", "3x32x32"], "--input applies to --data synthetic"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda"], "CUDA"),
    (["--no-such-flag"], "no-such-flag"),
]


@pytest.mark.parametrize("args,needle", TRAIN_BAD, ids=[" ".join(a) for a, _ in TRAIN_BAD])
def test_bad_train_input(args, needle, tmp_path):
    import torch
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", *args, "--out", str(out), "--no-progress"])
    check_one_line_exit_2(r, needle)
    assert not (out / "config.json").exists(), "half-written run directory left behind"


RUN_DIR_BAD = ["no-config", "config-not-json", "config-unknown-key", "config-bad-value",
               "config-list", "module-missing", "module-garbage", "module-truncated",
               "module-wrong-shape"]


@pytest.mark.parametrize("how", RUN_DIR_BAD)
def test_corrupted_run_directory_on_eval(how, good_run, tmp_path):
    d = corrupt(good_run, tmp_path, how)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    r = CliRunner().invoke(cli, ["eval", str(d)])
    check_one_line_exit_2(r, "")
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert before == after, "a failed command modified the run directory"


def test_eval_of_missing_directory():
    r = CliRunner().invoke(cli, ["eval", "/nonexistent/run"])
    check_one_line_exit_2(r, "no run directory")


def test_train_into_existing_run_is_refused(good_run):
    r = CliRunner().invoke(cli, ["train", "--out", str(good_run), "--no-progress"])
    check_one_line_exit_2(r, "already holds a run")


def check_one_line_exit_2(r, needle: str) -> None:
    out = r.output.strip()
    assert r.exit_code == 2, (r.exit_code, out, r.exception)
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    assert out.startswith("error:"), out
    assert needle in out, (needle, out)
