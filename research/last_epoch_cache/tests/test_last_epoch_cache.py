"""The last-epoch-cache study: its eval-pass arm is the product's sequential regime, the
paired statistics, and resuming."""
from __future__ import annotations

import pytest

import edgetrain
from edgetrain.config import RunConfig
from research.last_epoch_cache import last_epoch_cache as study

TINY = dict(data="digits", train_size=120, model="kmresnet", width=4, depth=2, modules=2,
            mode="sequential", transport=True, lr=0.1, tau=10.0, batch_size=50, epochs=2,
            memory_format="contiguous", seed=0, device="cpu")


def test_the_eval_pass_arm_is_the_products_sequential_run(tmp_path):
    """Same splits, batches, float16 cache rounding and evaluation: every depth's accuracy
    equals that of `edgetrain.train` (same machine and threads: exact)."""
    got = study.train_arm(RunConfig(**TINY), "eval-pass")
    m = edgetrain.train(RunConfig(**TINY, cache_dtype="float16"), tmp_path / "run")
    assert [d["test_acc"] for d in got["modules"]] == [d["test_acc"] for d in m["modules"]]
    assert [d["val_acc"] for d in got["modules"]] == [d["val_acc"] for d in m["modules"]]
    assert got["best_depth"] == m["best_depth"]
    other = study.train_arm(RunConfig(**TINY), "last-epoch")
    assert other["modules"][0] == got["modules"][0]  # module 0 trains the same way
    with pytest.raises(ValueError):
        study.train_arm(RunConfig(**TINY), "nope")


def test_paired_difference_and_resume(tmp_path):
    calls = []

    def fake(cfg, arm):
        calls.append((cfg.data, arm, cfg.seed))
        acc = 0.5 + 0.1 * cfg.seed + (0.03 if arm == "last-epoch" else 0.0)
        return {"modules": [{"val_acc": acc, "test_acc": acc}], "best_depth": 1,
                "best_val_acc": acc, "best_test_acc": acc, "last_test_acc": acc}

    data = {"digits": dict(train_size=100, epochs=1)}
    res = study.run_study(tmp_path, data, [0, 1, 2], train=fake)
    assert len(calls) == 6 and res["complete"]
    s = res["summary"]["digits"]
    assert s["paired_diff"] == pytest.approx([0.03] * 3)
    assert s["diff_last_epoch_minus_eval_pass"]["mean"] == pytest.approx(0.03)
    assert "| digits | eval-pass | 0 |" in (tmp_path / "last_epoch_cache.md").read_text()
    study.run_study(tmp_path, data, [0, 1, 2, 3], train=fake)  # resumes: only seed 3 runs
    assert len(calls) == 8
    with pytest.raises(edgetrain.errors.UserError):
        study.run_study(tmp_path, {"digits": dict(train_size=90, epochs=1)}, [0], train=fake)
