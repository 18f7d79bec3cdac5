"""RUN_DIR/log.jsonl: one line per epoch in every regime, continued (not repeated) by
`--resume`; `edgetrain status` reads it."""
from __future__ import annotations

import json
import re

from click.testing import CliRunner
import pytest

from edgetrain.cli import cli
from edgetrain.regimes.schedule import resume, train
from edgetrain.storage.runlog import read_log, run_status

# (mode, K, epochs, laps) -> lines expected: e2e/parallel one per epoch, else one per module-epoch
CASES = {"e2e": (1, 2, 1, 2), "parallel": (2, 2, 1, 2), "sequential": (2, 2, 1, 4),
         "multilap": (2, 2, 2, 4)}


@pytest.mark.parametrize("mode", list(CASES))
def test_one_line_per_epoch(tmp_path, tiny, mode):
    k, epochs, laps, expected = CASES[mode]
    cfg = tiny(mode=mode, modules=k, epochs=epochs, laps=laps, train_size=200, width=4, depth=2)
    train(cfg, tmp_path / "run")
    lines = read_log(tmp_path / "run" / "log.jsonl")
    assert len(lines) == expected
    assert [ln["done"] for ln in lines] == list(range(1, expected + 1))
    assert all(ln["total"] == expected and ln["samples"] == 200 for ln in lines)
    assert lines[-1]["eta_s"] == 0
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["modules"]
    if mode == "parallel":  # one line covers every module
        assert lines[-1]["module"] == [0, 1]
        assert lines[-1]["train_loss"] == [m["train_loss"] for m in history]
    else:  # the last line is the last module's last epoch
        assert lines[-1]["module"] == len(history) - 1
        assert lines[-1]["train_loss"] == history[-1]["train_loss"]
        if mode != "e2e":
            assert [(ln["lap"], ln["module"], ln["epoch"]) for ln in lines] == (
                [(0, 0, 1), (0, 0, 2), (0, 1, 1), (0, 1, 2)] if mode == "sequential" else
                [(0, 0, 1), (0, 1, 1), (1, 0, 2), (1, 1, 2)])
    assert all(ln["rss_mib"] > 0 and ln["samples_per_s"] > 0 for ln in lines)


def test_resume_continues_the_log(tmp_path, tiny, monkeypatch):
    """A run stopped after its second logged epoch resumes with the remaining lines only."""
    import edgetrain.regimes.out_of_core as ooc
    cfg = tiny(mode="sequential", modules=2, epochs=2, train_size=200, width=4, depth=2)
    real, calls = ooc.OutOfCore.write_state, []

    def stop_after_module_0(self, lap, module, epoch):
        real(self, lap, module, epoch)
        calls.append((lap, module, epoch))
        if (module, epoch) == (1, 0):  # module 0 done, before module 1's first epoch
            raise KeyboardInterrupt
    monkeypatch.setattr(ooc.OutOfCore, "write_state", stop_after_module_0)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run")
    assert len(read_log(tmp_path / "run" / "log.jsonl")) == 2
    s = run_status(tmp_path / "run")
    assert s["state"] != "finished" and s["cursor"] == {"lap": 0, "module": 1, "epoch": 0}
    monkeypatch.setattr(ooc.OutOfCore, "write_state", real)
    resume(tmp_path / "run")
    lines = read_log(tmp_path / "run" / "log.jsonl")
    assert [(ln["module"], ln["epoch"], ln["done"]) for ln in lines] == [
        (0, 1, 1), (0, 2, 2), (1, 1, 3), (1, 2, 4)]


def test_status_command(tmp_path, tiny):
    train(tiny(mode="sequential", epochs=1, train_size=200, width=4, depth=2), tmp_path / "run")
    res = CliRunner().invoke(cli, ["status", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "state      finished" in res.output and re.search(r"2/2 epochs", res.output)
    assert "best depth" in res.output
    res = CliRunner().invoke(cli, ["status", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
