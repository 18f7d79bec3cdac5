import json
import os
import subprocess
import sys

from click.testing import CliRunner
import pytest

from edgetrain.cli import cli

TINY = ["--data", "digits", "--train-size", "300", "--model", "kmresnet", "--width", "8",
        "--depth", "4", "--modules", "2", "--epochs", "2", "--laps", "2", "--no-progress"]


def test_train_then_eval_through_cli_runner(tmp_path):
    r = CliRunner().invoke(cli, ["train", *TINY, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "best depth" in r.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 1 <= m["best_depth"] <= 2
    r2 = CliRunner().invoke(cli, ["eval", str(tmp_path / "run")])
    assert r2.exit_code == 0, r2.output
    # eval re-computes exactly the accuracies written at the end of training
    lines = [l.split() for l in r2.output.splitlines()[1:3]]
    assert [float(l[2]) for l in lines] == pytest.approx(
        [mm["test_acc"] for mm in m["modules"]], abs=1e-4)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_metrics_keep_every_epoch_and_tau_only_with_transport(tmp_path, mode):
    """metrics.json's modules carry their per-epoch history (resident and out-of-core
    regimes alike) and a tau only when the transport penalty trained them."""
    for name, extra in (("trgl", []), ("vangl", ["--no-transport"])):
        out = tmp_path / name
        r = CliRunner().invoke(cli, ["train", *TINY, "--mode", mode, *extra, "--out", str(out)])
        assert r.exit_code == 0, r.output
        m = json.loads((out / "metrics.json").read_text())
        for mm in m["modules"]:
            assert [h["epoch"] for h in mm["history"]] == [0, 1]
            assert set(mm["history"][0]) == {"epoch", "train_loss", "train_acc", "transport"}
            assert mm["history"][-1]["train_loss"] == mm["train_loss"]
            assert 0 <= mm["history"][0]["train_acc"] <= 1
            assert (mm["tau"] is None) == (name == "vangl")


def test_installed_script_runs_in_a_subprocess(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "edgetrain")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "edgetrain.cli"]
    p = subprocess.run([*cmd, "train", *TINY, "--mode", "sequential", "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "r" / "modules" / "01.safetensors").is_file()


BAD = [
    (["train", "--model", "nope"], "unknown model"),
    (["train", "--data", "nope"], "unknown dataset"),
    (["train", "--modules", "0"], "--modules"),
    (["train", "--modules", "99"], "--modules"),
    (["train", "--tau", "0"], "--tau"),
    (["train", "--tau", "-1"], "--tau"),
    (["train", "--mode", "multilap", "--epochs", "5", "--laps", "2"], "multiple of --laps"),
    (["train", "--train-size", "100000"], "--train-size"),
    (["train", "--mode", "bogus"], "--mode"),
    (["train", "--epochs", "abc"], "epochs"),
    (["train", "--out", "/proc/forbidden/run"], "cannot write"),
    (["eval", "/nonexistent/run"], "no run directory"),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, (r.output, r.exception)
    out = r.output.strip()
    assert len(out.splitlines()) == 1 and needle in out, out
    assert "Traceback" not in out
