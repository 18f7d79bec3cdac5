"""The planner and `train --fit` with `--recompute`: tried only when nothing fits without it
(segments:2, then blocks), kept when given, printed with its estimated time cost, and
passed through to the run."""
from __future__ import annotations

import dataclasses
import json
import random

from click.testing import CliRunner
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from edgetrain.budget import fit as fitmod
from edgetrain.budget import guard, planner
import edgetrain.budget.estimate as predict
from edgetrain.budget.planner import RECOMPUTE_ORDER, format_plan, needed_bytes, plan
from edgetrain.budget.simulate import step_flops
from edgetrain.cli import cli
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.units import MIB
from tests.test_fit import BASE, _opts
from tests.test_plan import BASELINE, _key, fake_predict, reference_order

SCALE = {"none": 1.0, "segments:2": 0.6, "segments:3": 0.5, "blocks": 0.4}  # fake saving
RATIO = {"none": 1.0, "segments:2": 1.3, "segments:3": 1.3, "blocks": 1.35}  # fake cost


def fake_recompute_predict(cfg: RunConfig, input_shape, num_classes, n_train=None):
    """`fake_predict` (memory grows with the batch, falls with K) times SCALE[recompute]."""
    peak = int(fake_predict(cfg, input_shape, num_classes).peak_bytes * SCALE[cfg.recompute])
    return predict.PeakEstimate(1, 1, 1, 1, 1, 1, 0, peak, 0, 0, peak, 0)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(planner, "estimate_peak", fake_recompute_predict)
    monkeypatch.setattr(planner, "recompute_time_ratio", lambda cfg, s, n: RATIO[cfg.recompute])
    monkeypatch.setattr(planner, "runtime_baseline_bytes", lambda: BASELINE)
    monkeypatch.setattr(planner, "_count_blocks", lambda cfg, shape, nc: 18)
    monkeypatch.setattr(planner, "SAFETY", 1.15)
    monkeypatch.setattr(planner, "HEADROOM_BYTES", 0)


def test_recompute_is_planned_and_ordered_by_cost():
    assert "recompute" in planner.PLANNED
    assert RECOMPUTE_ORDER == ("none", "segments:2", "blocks")


def test_plan_matches_brute_force_rule_with_recompute(fake):
    """The documented rule over every setting: the first fitting candidate of the plain
    search, else of the search with segments:2, else with blocks; else the least need."""
    base = RunConfig(batch_size=128, cache_dtype="float16")
    order = [dataclasses.replace(c, recompute=r) for r in RECOMPUTE_ORDER
             for c in reference_order(base, 18, "float16")]
    needs = [needed_bytes(fake_recompute_predict(c, None, 10), BASELINE) for c in order]
    rng = random.Random(0)
    budgets = sorted({*needs, *(n - 1 for n in needs)}) + [rng.randrange(BASELINE + 1, 2**31)
                                                            for _ in range(30)]
    seen = set()
    for budget in budgets:
        p = plan(base, (3, 32, 32), 10, None, budget)
        fitting = [c for c, n in zip(order, needs) if n <= budget]
        if fitting:
            assert p.fits and (_key(p.cfg), p.cfg.recompute) == (
                _key(fitting[0]), fitting[0].recompute), budget
        else:
            assert not p.fits and p.needed_bytes == min(needs)
        assert p.step_time_ratio == RATIO[p.cfg.recompute]
        seen.add(p.cfg.recompute)
    assert seen == set(RECOMPUTE_ORDER)  # every setting was chosen for some budget


def test_plain_plan_that_fits_never_recomputes(fake):
    plain = [needed_bytes(fake_recompute_predict(c, None, 10), BASELINE)
             for c in reference_order(RunConfig(batch_size=64), 18, "float16")]
    p = plan(RunConfig(batch_size=64), (3, 32, 32), 10, None, min(plain))
    assert p.fits and p.cfg.recompute == "none" and p.step_time_ratio == 1.0
    assert "recompute" not in format_plan(p)  # the default printout is unchanged


@pytest.mark.parametrize("given", ["none", "segments:3", "blocks"])
def test_given_recompute_is_kept(fake, given):
    base = RunConfig(batch_size=64, recompute=given)
    roomy = plan(base, (3, 32, 32), 10, None, 8 * 2**30, fixed={"recompute"})
    assert roomy.fits and roomy.cfg.recompute == given  # kept even where none would fit
    tight = plan(base, (3, 32, 32), 10, None, BASELINE + 8 * MIB, fixed={"recompute"})
    assert tight.cfg.recompute == given  # never another setting, fitting or not


# --------------------------------------------------------------------------- real estimator
REAL = RunConfig(data="synthetic", input_shape=(3, 32, 32), model="resnet20", width=8,
                 mode="e2e", modules=1, batch_size=32, epochs=1)
REAL_FIXED = {"mode", "batch_size"}  # keeps the search to one candidate per setting


def _memo(fn):
    """`fn` remembering its results by the repr of its arguments (RunConfig is unhashable)."""
    seen = {}

    def call(*args):
        key = repr(args)
        if key not in seen:
            seen[key] = fn(*args)
        return seen[key]
    return call


@pytest.fixture
def real(monkeypatch):
    """The real estimator and time ratio, each configuration computed once per test."""
    monkeypatch.setattr(planner, "runtime_baseline_bytes", lambda: BASELINE)
    monkeypatch.setattr(planner, "estimate_peak", _memo(predict.estimate_peak))
    monkeypatch.setattr(planner, "recompute_time_ratio", _memo(predict.recompute_time_ratio))
    return {r: needed_bytes(planner.estimate_peak(dataclasses.replace(REAL, recompute=r),
                                                  (3, 32, 32), 10, None), BASELINE)
            for r in RECOMPUTE_ORDER}


def test_real_plan_recomputes_only_below_the_plain_minimum(real):
    need = real
    assert need["blocks"] < need["segments:2"] < need["none"]  # the estimator sees the saving
    expect = [(need["none"], "none"), (need["none"] - 1, "segments:2"),
              (need["segments:2"], "segments:2"), (need["segments:2"] - 1, "blocks")]
    for budget, recompute in expect:
        p = plan(REAL, (3, 32, 32), 10, None, budget, fixed=REAL_FIXED)
        assert p.fits and p.cfg.recompute == recompute, (budget, recompute)
        assert (p.step_time_ratio > 1.1) == (recompute != "none"), p.step_time_ratio
    p = plan(REAL, (3, 32, 32), 10, None, need["blocks"] - 1, fixed=REAL_FIXED)
    assert not p.fits and p.needed_bytes == need["blocks"] and p.cfg.recompute == "blocks"
    p = plan(REAL, (3, 32, 32), 10, None, need["none"] - 1, fixed=REAL_FIXED | {"recompute"})
    assert not p.fits and p.cfg.recompute == "none"  # given: never recomputed behind its back


def test_real_plan_prints_its_time_cost_and_command(real):
    p = plan(REAL, (3, 32, 32), 10, None, real["none"] - 1, fixed=REAL_FIXED)
    text = format_plan(p)
    assert ", recompute segments:2  (" in text
    assert (f"recompute   segments:2: trades time for memory, each training step "
            f"~{p.step_time_ratio:.2f}x as long as without it") in text
    assert "--recompute segments:2" in p.command()


@pytest.fixture
def real_baseline(monkeypatch):
    monkeypatch.setattr(planner, "runtime_baseline_bytes", lambda: BASELINE)


@pytest.mark.parametrize("given, kept", [(["--recompute", "blocks"], "blocks"), ([], "none")])
def test_plan_cli_keeps_a_given_recompute(real_baseline, given, kept):
    res = CliRunner().invoke(cli, ["plan", "--memory-budget", "4GiB", "--model", "kmresnet",
                                   "--width", "4", "--depth", "2", "--train-size", "100",
                                   *given])
    assert res.exit_code == 0, res.output
    assert (f", recompute {kept}  (" in res.output) == (kept != "none")
    assert ("recompute   blocks: trades time for memory" in res.output) == (kept != "none")
    assert ("--recompute blocks" in res.output) == (kept != "none")


def test_time_ratio_counts_one_more_forward_of_the_module_body():
    """The FLOPs that recomputation adds are exactly one forward of the stem and blocks
    (the head is not recomputed), in the estimate the planner prints."""
    cfg = dataclasses.replace(REAL, mode="sequential", modules=1, recompute="blocks")
    with torch.random.fork_rng(devices=[]):
        stage = predict._build_stages(cfg, (3, 32, 32), 10)[0]
    flops = {}
    for r in ("none", "blocks"):
        stage.set_recompute(r)
        tr = predict._trainers([stage], cfg, True)[0]
        flops[r] = step_flops([tr], (3, 32, 32), cfg)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        stage.eval().features(torch.empty(cfg.batch_size, 3, 32, 32, device="meta"))
    body = counter.get_total_flops()
    assert body > 0 and flops["blocks"] - flops["none"] == body
    ratio = predict.recompute_time_ratio(cfg, (3, 32, 32), 10)
    assert ratio == pytest.approx(flops["blocks"] / flops["none"])
    assert 1.2 < ratio < 1.4  # backward ~ 2 forwards: about (1 + 2 + 1) / (1 + 2)
    assert predict.recompute_time_ratio(dataclasses.replace(cfg, recompute="none"),
                                        (3, 32, 32), 10) == 1.0


# --------------------------------------------------------------------------- train --fit
@pytest.fixture
def fit_fake(monkeypatch):
    """Nothing fits 6 GiB without recomputation; everything fits with it."""
    def pred(cfg, input_shape, num_classes, n_train=None):
        peak = 8 * 2**30 if cfg.recompute == "none" else 64 * MIB
        return predict.PeakEstimate(1, 1, 1, 1, 1, 1, 0, peak, 0, 0, peak, 0)
    monkeypatch.setattr(planner, "estimate_peak", pred)
    for mod in (planner, guard):
        monkeypatch.setattr(mod, "runtime_baseline_bytes", lambda: 100 * MIB)


def test_fit_keeps_a_given_recompute(fit_fake, tmp_path):
    cfg, text = fitmod.fit_config(_opts(recompute="blocks"), set(BASE) | {"recompute"}, None,
                                  "6GiB", tmp_path)
    kept = next(ln for ln in text.splitlines() if ln.startswith("kept"))
    assert cfg.recompute == "blocks" and "recompute=blocks" in kept
    with pytest.raises(UserError, match="nothing fits in "):
        fitmod.fit_config(_opts(recompute="none"), set(BASE) | {"recompute"}, None, "6GiB",
                          tmp_path)


def test_fit_trains_with_the_chosen_recompute(fit_fake, tmp_path):
    """A real (tiny) `train --fit` run where only recomputation fits: config.json and the
    run carry segments:2, and the printed plan says what it costs in time."""
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, [
        "train", "--fit", "--memory-budget", "6GiB", "--out", str(out), "--no-progress",
        "--data", "digits", "--train-size", "160", "--model", "kmresnet", "--width", "4",
        "--depth", "2", "--epochs", "1", "--batch-size", "64"])
    assert res.exit_code == 0, res.output
    assert "recompute   segments:2: trades time for memory" in res.output
    assert "recompute=segments:2" in res.output.split("chosen", 1)[1].splitlines()[0]
    chosen = json.loads((out / "config.json").read_text())
    assert chosen["recompute"] == "segments:2" and chosen["mode"] == "e2e"
    assert chosen["extra"]["fit"]["step_time_ratio"] > 1.0
    assert json.loads((out / "metrics.json").read_text())["best_depth"] >= 1
