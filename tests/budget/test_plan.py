"""The planner: its preference rule (against a brute-force reference), `edgetrain plan`,
and running the printed command under the planned budget.

Also (was test_plan_recompute.py): The planner and `train --fit` with `--recompute`: tried only when nothing fits without it
(segments:2, then blocks), kept when given, printed with its estimated time cost, and
passed through to the run.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import shlex
import subprocess
import sys
from click.testing import CliRunner
import pytest
from edgetrain.budget.devices import load_profile
import edgetrain.budget.estimate as predict
from edgetrain.cli import cli
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
import edgetrain.measure as memory
from edgetrain.units import MIB
import torch
from torch.utils.flop_counter import FlopCounterMode
from edgetrain.budget import fit as fitmod
from edgetrain.budget import guard, planner
from edgetrain.budget.planner import RECOMPUTE_ORDER, format_plan, needed_bytes, plan
from edgetrain.budget.simulate import step_flops
from tests.budget.test_fit import BASE, _opts


BASELINE = 100 * MIB


def fake_predict(cfg: RunConfig, input_shape, num_classes, n_train=None):
    """A monotone stand-in for the predictor: memory grows with the batch, falls with K."""
    b = cfg.batch_size
    if cfg.mode == "e2e":
        peak = 8 * MIB * b
    elif cfg.mode == "parallel":
        peak = 2 * MIB * b + 6 * MIB * b // cfg.modules // (2 if cfg.split == "memory" else 1)
    else:
        peak = 24 * MIB * b // cfg.modules + (6 if cfg.cache_dtype == "float32" else 3) * MIB
    return predict.PeakEstimate(1, 1, 1, 1, 1, 1, 0, peak, 0, 0, peak, 0)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(planner, "estimate_peak", fake_predict)  # where the planner reads them
    monkeypatch.setattr(planner, "runtime_baseline_bytes", lambda: BASELINE)
    monkeypatch.setattr(planner, "_count_blocks", lambda cfg, shape, nc: 18)
    monkeypatch.setattr(planner, "SAFETY", 1.15)  # the examples below are worked out with it
    monkeypatch.setattr(planner, "HEADROOM_BYTES", 0)


def reference_order(base: RunConfig, n_blocks: int, dtype: str) -> list[RunConfig]:
    """The documented rule spelled out without pruning: tier, regime, K, batch, split, dtype."""
    batches = [base.batch_size // 2 ** i for i in range(10) if base.batch_size // 2 ** i >= 8]
    tiers = [[b for b in batches if b >= 32], [b for b in batches if b < 32]]
    ks = [2, 4, 8, 16, 18]
    out = []
    for tier in tiers:
        out += [dataclasses.replace(base, mode="e2e", modules=1, batch_size=b) for b in tier]
        for mode in ("parallel", "multilap"):
            dts = [dtype, "float16"] if mode == "multilap" and dtype == "float32" else (
                [dtype] if mode == "multilap" else [base.cache_dtype])
            for k in ks:
                for b in tier:
                    for split in (("depth", "memory") if k < n_blocks else ("depth",)):
                        out += [dataclasses.replace(base, mode=mode, modules=k, batch_size=b,
                                                    split=split, cache_dtype=dt) for dt in dts]
    return out


def _key(c: RunConfig):
    return (c.mode, c.modules, c.batch_size, c.split, c.cache_dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_plan_matches_brute_force_rule(fake, dtype):
    base = RunConfig(batch_size=128, cache_dtype=dtype)
    order = reference_order(base, 18, dtype)
    needs = [needed_bytes(fake_predict(c, None, 10), BASELINE) for c in order]
    rng = random.Random(0)
    budgets = sorted({*needs, *(n - 1 for n in needs)}) + [rng.randrange(BASELINE + 1, 3 * 2**30)
                                                            for _ in range(30)]
    for budget in budgets:
        p = plan(base, (3, 32, 32), 10, None, budget)
        fitting = [c for c, n in zip(order, needs) if n <= budget]
        if fitting:
            assert p.fits and _key(p.cfg) == _key(fitting[0]), budget
            assert p.needed_bytes <= budget
        else:
            assert not p.fits and p.needed_bytes == min(needs)


def test_plan_rule_examples(fake):
    base = RunConfig(batch_size=64)
    big = plan(base, (3, 32, 32), 10, None, 4 * 2**30)
    assert (big.cfg.mode, big.cfg.batch_size) == ("e2e", 64)
    # e2e at 32 needs 100 MiB + 1.15 x 256 MiB; just below that parallel K=2 wins, at batch
    # 64 with the memory split (224 MiB) rather than at 32 with the depth split (160 MiB)
    p = plan(base, (3, 32, 32), 10, None, BASELINE + int(1.15 * 256 * MIB) - 1)
    assert (p.cfg.mode, p.cfg.modules, p.cfg.batch_size, p.cfg.split) == (
        "parallel", 2, 64, "memory")
    # 20 MiB over the runtime: parallel misses even at K=18, batch 8 (18.7 MiB x 1.15);
    # multilap K=16 at batch 8 (15 MiB) is the smallest K that fits
    small = plan(base, (3, 32, 32), 10, None, BASELINE + 20 * MIB)
    assert (small.cfg.mode, small.cfg.modules, small.cfg.batch_size) == ("multilap", 16, 8)


def test_nothing_fits_then_smallest_budget_fits(fake):
    base = RunConfig(batch_size=64)
    p = plan(base, (3, 32, 32), 10, None, BASELINE + MIB)
    assert not p.fits and p.needed_bytes > BASELINE + MIB
    again = plan(base, (3, 32, 32), 10, None, p.needed_bytes)
    assert again.fits and again.needed_bytes == p.needed_bytes


def test_budget_below_runtime(fake):
    with pytest.raises(UserError, match="below the runtime itself"):
        plan(RunConfig(), (3, 32, 32), 10, None, BASELINE - 1)


def test_train_command_round_trips():
    cfg = RunConfig(data="synthetic", input_shape=(3, 96, 96), model="resnet110", mode="multilap",
                    modules=8, split="memory", batch_size=32, cache_dtype="bfloat16", epochs=4,
                    laps=2, transport=False, width=8)
    cmd = planner.train_command(cfg, load_profile("cpu-2gb"))
    args = shlex.split(cmd)
    assert args[:2] == ["edgetrain", "train"] and args[-2:] == ["--device-profile", "cpu-2gb"]
    from edgetrain.cli import config_from_options, train
    ctx = train.make_context("train", args[2:])
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"device_profile"} | {"no_transport"}
    opts = {k: v for k, v in ctx.params.items() if k in fields}
    assert ctx.params["device_profile"] == "cpu-2gb"
    assert config_from_options(opts) == cfg


# --------------------------------------------------------------------------- real predictor
TINY = ["--model", "kmresnet", "--width", "8", "--depth", "4", "--data", "digits",
        "--train-size", "300", "--epochs", "2", "--laps", "2",
        "--precision", "fp32"]  # the budgets below are fp32's (plan's default is auto, #29)


def _tiny_need(mode: str, **kw) -> int:
    cfg = RunConfig(data="digits", train_size=300, model="kmresnet", width=8, depth=4, epochs=2,
                    laps=2, mode=mode, modules=1 if mode == "e2e" else 2, **kw)
    pred = predict.estimate_peak(cfg, (1, 8, 8), 10, 300)
    return needed_bytes(pred, memory.runtime_baseline_bytes())


def test_plan_cli_prints_phases_and_command():
    budget = _tiny_need("e2e") - 1  # just too small for end-to-end at the largest batch
    res = CliRunner().invoke(cli, ["plan", "--memory-budget", str(budget), *TINY])
    assert res.exit_code == 0, res.output
    for key in ("phase: train step", "phase: cache write", "phase: eval", "cache disk",
                "data pack", "runtime baseline", "command     edgetrain train"):
        assert key in res.output
    assert "--mode e2e --epochs 2 --batch-size 64" not in res.output


def test_plan_cli_nothing_fits_gives_smallest_budget():
    tiny = memory.runtime_baseline_bytes() + 1024  # above the runtime, below any plan
    res = CliRunner().invoke(cli, ["plan", "--memory-budget", str(tiny), *TINY])
    assert res.exit_code == 2
    m = re.search(r"nothing fits in .*needs .* \((\d+) bytes\)", res.output)
    assert m, res.output
    res = CliRunner().invoke(cli, ["plan", "--memory-budget", m.group(1), *TINY])
    assert res.exit_code == 0 and "command" in res.output


def test_plan_cli_shows_the_data_pack_to_write_and_writes_nothing(fake, tmp_path):
    """An image folder not yet packed: the plan shows the pack's bytes and its data cache,
    from the folder's scan and image headers, and packs nothing; the printed command keeps
    the data cache and the image size."""
    from tests.budget.test_fit import image_folder  # noqa: F811 one folder maker for the fit and plan tests
    root, dc = image_folder(tmp_path / "imgs"), tmp_path / "dc"
    res = CliRunner().invoke(cli, ["plan", "--memory-budget", "2GiB", "--data", str(root),
                                   "--data-cache", str(dc), "--image-size", "8x8", "--model",
                                   "kmresnet", "--width", "4", "--depth", "2"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("data pack"))
    assert re.search(rf"data pack   [\d.]+ KiB to write once, in {re.escape(str(dc))} ", line)
    assert f"--data-cache {dc}" in res.output and "--image-size 8x8" in res.output
    assert not dc.exists()


@pytest.mark.parametrize("args, match", [
    (["--device-profile", "no-such-board"], "unknown device profile"),
    ([], "exactly one of"),
    (["--device-profile", "cpu-2gb", "--memory-budget", "1GiB"], "exactly one of"),
    (["--memory-budget", "1KiB"], "below the runtime itself"),
    (["--memory-budget", "1GiB", "--model", "nosuchnet"], "model"),
])
def test_plan_cli_errors_one_line(args, match):
    res = CliRunner().invoke(cli, ["plan", *args])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and re.search(match, lines[0]), res.output


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _plan_then_train(plan_args: list[str], tmp_path, budget_bytes: int) -> dict:
    """`edgetrain plan` in a subprocess, then its printed command (plus --out), also fresh."""
    exe = [sys.executable, "-m", "edgetrain.cli"]
    p = _run(exe + ["plan", *plan_args])
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("command"))
    args = shlex.split(line.split(None, 1)[1])
    assert args[:2] == ["edgetrain", "train"]
    out = tmp_path / "run"
    t = _run(exe + args[1:] + ["--out", str(out), "--no-progress"])
    assert t.returncode == 0, t.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["peak_rss_mib"] * MIB <= budget_bytes
    return {"plan": p.stdout, "metrics": metrics, "args": args}


SMALL = ["--model", "kmresnet", "--width", "16", "--depth", "4", "--input", "3x32x32",
         "--synthetic-size", "160", "--epochs", "2", "--laps", "2", "--precision", "fp32"]


def test_planned_command_runs_under_its_budget(tmp_path):
    """A budget just too small for end-to-end at batch 64: the printed command completes
    under it with the watchdog on (a fresh process for the plan and for the run)."""
    need = {b: needed_bytes(predict.estimate_peak(
        RunConfig(data="synthetic", input_shape=(3, 32, 32), synthetic_size=160, model="kmresnet",
                  width=16, depth=4, mode="e2e", modules=1, epochs=2, batch_size=b),
        (3, 32, 32), 10, 144), memory.runtime_baseline_bytes()) for b in (64, 32)}
    # halfway between e2e at batch 64 and at 32: the plan's own process measures the runtime
    # baseline again, and that figure moves by a few MiB between processes
    budget = (need[64] + need[32]) // 2
    done = _plan_then_train(["--memory-budget", str(budget), *SMALL], tmp_path, budget)
    args = done["args"]
    chosen = (args[args.index("--mode") + 1], args[args.index("--batch-size") + 1])
    assert chosen != ("e2e", "64")


@pytest.mark.slow
def test_cpu_2gb_resnet110_96(tmp_path):
    """The issue's example: a plan for cpu-2gb, and its command (on 64 synthetic samples,
    one epoch) completes under the profile's budget with the watchdog on."""
    prof = load_profile("cpu-2gb")
    res = CliRunner().invoke(cli, ["plan", "--device", "cpu-2gb", "--model", "resnet110",
                                   "--input", "3x96x96"])
    assert res.exit_code == 0 and "command     edgetrain train" in res.output, res.output
    done = _plan_then_train(["--device", "cpu-2gb", "--model", "resnet110", "--input", "3x96x96",
                             "--synthetic-size", "64", "--epochs", "1", "--laps", "1"],
                            tmp_path, prof.budget_bytes)
    assert "--device-profile cpu-2gb" in " ".join(done["args"])


# ---------------------------------------------------------------------- (was test_plan_recompute.py)
SCALE = {"none": 1.0, "segments:2": 0.6, "segments:3": 0.5, "blocks": 0.4}  # fake saving
RATIO = {"none": 1.0, "segments:2": 1.3, "segments:3": 1.3, "blocks": 1.35}  # fake cost


def fake_recompute_predict(cfg: RunConfig, input_shape, num_classes, n_train=None):
    """`fake_predict` (memory grows with the batch, falls with K) times SCALE[recompute]."""
    peak = int(fake_predict(cfg, input_shape, num_classes).peak_bytes * SCALE[cfg.recompute])
    return predict.PeakEstimate(1, 1, 1, 1, 1, 1, 0, peak, 0, 0, peak, 0)


@pytest.fixture
def fake_recompute(monkeypatch):
    monkeypatch.setattr(planner, "estimate_peak", fake_recompute_predict)
    monkeypatch.setattr(planner, "recompute_time_ratio", lambda cfg, s, n: RATIO[cfg.recompute])
    monkeypatch.setattr(planner, "runtime_baseline_bytes", lambda: BASELINE)
    monkeypatch.setattr(planner, "_count_blocks", lambda cfg, shape, nc: 18)
    monkeypatch.setattr(planner, "SAFETY", 1.15)
    monkeypatch.setattr(planner, "HEADROOM_BYTES", 0)


def test_recompute_is_planned_and_ordered_by_cost():
    assert "recompute" in planner.PLANNED
    assert RECOMPUTE_ORDER == ("none", "segments:2", "blocks")


def test_plan_matches_brute_force_rule_with_recompute(fake_recompute):
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


def test_plain_plan_that_fits_never_recomputes(fake_recompute):
    plain = [needed_bytes(fake_recompute_predict(c, None, 10), BASELINE)
             for c in reference_order(RunConfig(batch_size=64), 18, "float16")]
    p = plan(RunConfig(batch_size=64), (3, 32, 32), 10, None, min(plain))
    assert p.fits and p.cfg.recompute == "none" and p.step_time_ratio == 1.0
    assert "recompute" not in format_plan(p)  # the default printout is unchanged


@pytest.mark.parametrize("given", ["none", "segments:3", "blocks"])
def test_given_recompute_is_kept(fake_recompute, given):
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
