"""The light head's accuracy-cost benchmark: paired statistics, rows written as they come,
resuming, and one real tiny run through the product path."""
from __future__ import annotations

import json

import pytest

from research.head_cost import head_cost
from edgetrain.errors import UserError

TINY = dict(model="kmresnet", width=4, depth=2, modules=2, mode="sequential", transport=True,
            lr=0.1, tau=10.0, batch_size=50, augment=False)
DATA = {"digits": dict(train_size=100, epochs=1)}
WIDE = {**TINY, "width": 64}  # wide enough for the light head to be the smaller one (c/4 >= 16)


def _fake_run(calls: list):
    def run_one(cfg):
        calls.append((cfg.data, cfg.head, cfg.seed))
        acc = 0.5 + 0.1 * cfg.seed - (0.02 if cfg.head == "dgl-light" else 0.0)
        return {"modules": [], "best_depth": 1, "best_val_acc": acc, "best_test_acc": acc,
                "last_test_acc": acc, "train_s": 0.0, "run_s": 0.0}
    return run_one


def test_paired_difference_and_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(head_cost, "run_one", _fake_run(calls))
    res = head_cost.run_head_cost(tmp_path, DATA, [0, 1, 2], WIDE)
    assert len(calls) == 6 and res["complete"]
    s = res["summary"]["digits"]
    assert s["paired_seeds"] == [0, 1, 2]
    assert s["paired_diff"] == pytest.approx([-0.02] * 3)
    assert s["diff_light_minus_dgl"]["mean"] == pytest.approx(-0.02)
    assert s["heads"]["dgl"]["mean"] == pytest.approx(0.6)
    assert s["heads"]["dgl"]["std"] == pytest.approx(0.1)
    # each head's parameters per module, and the light head is the smaller one
    assert all(light < dgl for dgl, light in zip(res["heads"]["digits"]["dgl"],
                                                  res["heads"]["digits"]["dgl-light"]))
    saved = json.loads((tmp_path / "head_cost.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(res["summary"]))
    assert "| digits |" in (tmp_path / "head_cost.md").read_text()
    again = head_cost.run_head_cost(tmp_path, DATA, [0, 1, 2, 3], WIDE)
    assert calls[6:] == [("digits", "dgl", 3), ("digits", "dgl-light", 3)]  # only the new seed
    assert len(again["runs"]) == 8
    with pytest.raises(UserError, match="other settings"):
        head_cost.run_head_cost(tmp_path, DATA, [0, 1], {**TINY, "lr": 0.2})


def test_another_reference_and_model_name_their_results(tmp_path, monkeypatch):
    """--reference R and --model M: the candidate is paired with R, the files say both."""
    calls = []
    monkeypatch.setattr(head_cost, "run_one", _fake_run(calls))
    res = head_cost.run_head_cost(tmp_path, DATA, [0, 1], {**WIDE, "model": "resnet20",
                                                           "width": None, "depth": None},
                                  candidate="dgl-k1", reference="dgl-s2")
    assert calls == [("digits", h, s) for s in (0, 1) for h in ("dgl-s2", "dgl-k1")]
    assert res["compared"] == ["dgl-s2", "dgl-k1"]
    assert res["summary"]["digits"]["paired_diff"] == pytest.approx([0.0, 0.0])
    md = (tmp_path / "head_cost-dgl-k1-vs-dgl-s2-on-resnet20.md").read_text()
    assert "`--head dgl-k1` vs `--head dgl-s2`" in md and "dgl-k1 - dgl-s2" in md
    assert head_cost.stem_of("dgl-light") == "head_cost"
    assert head_cost.stem_of("dgl-s2") == "head_cost-dgl-s2"


def test_rows_are_written_as_they_finish(tmp_path, monkeypatch):
    calls, fake = [], None

    def stop_after_three(cfg):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fake(cfg)
    fake = _fake_run(calls)
    monkeypatch.setattr(head_cost, "run_one", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        head_cost.run_head_cost(tmp_path, DATA, [0, 1], TINY)
    saved = json.loads((tmp_path / "head_cost.json").read_text())
    assert len(saved["runs"]) == 3 and not saved["complete"]
    assert saved["summary"]["digits"]["paired_seeds"] == [0]  # seed 1 has one head only
    assert "Incomplete" in (tmp_path / "head_cost.md").read_text()


def test_real_tiny_run_forces_each_head(tmp_path):
    res = head_cost.run_head_cost(tmp_path, DATA, [0, 1], TINY)
    runs = res["runs"]
    assert [(r["head"], r["seed"]) for r in runs] == [
        ("dgl", 0), ("dgl-light", 0), ("dgl", 1), ("dgl-light", 1)]
    assert all(0.0 <= r["best_test_acc"] <= 1.0 for r in runs)
    a, b = (r["best_test_acc"] for r in runs[:2])
    assert res["summary"]["digits"]["paired_diff"][0] == pytest.approx(b - a)
