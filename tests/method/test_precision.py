"""`--precision fp32|bf16|fp16` (#17): fp32 changes nothing; bf16 runs every forward of every
regime under autocast with float32 weights; fp16 needs CUDA; the estimator counts 2-byte
activations; a bf16 run resumes bit-identically."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner
import pytest
from safetensors.torch import load_file
import torch

from edgetrain.budget.estimate import estimate_peak
from edgetrain.budget import planner
from edgetrain.budget.planner import train_command
from edgetrain.cli import cli
from edgetrain.config import RunConfig
from edgetrain.errors import Stopped, UserError
from edgetrain.method import precision as precision_mod
from edgetrain.method.loop import make_trainer, train_step
from edgetrain.method.precision import autocast, compute_input
from edgetrain.method.transport import transport_cost
from edgetrain.regimes import out_of_core, schedule
from edgetrain.regimes.run import build_run
from edgetrain.regimes.schedule import resume, train
from edgetrain.storage.rundir import config_hash
from edgetrain.units import MIB
from tests.conftest import tiny_cfg
from tests.cli.test_bad_inputs import check_one_line_exit_2
from tests.budget.test_simulate import real_and_simulated_step_peaks

TINY = ["--data", "digits", "--train-size", "120", "--test-size", "100", "--model", "kmresnet",
        "--width", "4", "--depth", "2", "--modules", "2", "--epochs", "1", "--laps", "1",
        "--batch-size", "32", "--seed", "0", "--device", "cpu", "--no-progress"]


def small(**kw) -> RunConfig:
    base = dict(train_size=120, test_size=100, width=4, depth=2, batch_size=32, epochs=1,
                laps=1, device="cpu", precision="bf16")
    return tiny_cfg(**{**base, **kw})


# ------------------------------------------------------------------ fp32: nothing changes
def test_fp32_is_the_default_and_a_null_context():
    cfg = RunConfig()
    assert cfg.precision == "fp32" and cfg.cache_dtype == "float16"  # the old default
    x = torch.ones(2, 3)
    assert compute_input(x, "fp32") is x
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_a_config_from_before_precision_hashes_as_it_did():
    """A run directory written before --precision existed (no `precision` key in its
    config.json, state.json holding the old hash) still resumes."""
    old = RunConfig(mode="sequential").to_dict()
    del old["precision"], old["precision_requested"], old["memory_format"], old["compile"]  # none existed then
    old_hash = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert config_hash(RunConfig.from_dict(old)) == old_hash
    assert config_hash(RunConfig(mode="sequential", precision="bf16")) != old_hash
    assert config_hash(RunConfig(mode="sequential", memory_format="contiguous")) != old_hash


def test_cache_dtype_follows_the_precision_unless_given():
    assert RunConfig(precision="bf16").cache_dtype == "bfloat16"
    assert RunConfig(precision="fp16").cache_dtype == "float16"
    assert RunConfig(precision="bf16", cache_dtype="float16").cache_dtype == "float16"
    assert RunConfig(precision="fp32", cache_dtype="float32").cache_dtype == "float32"
    again = RunConfig.from_dict(RunConfig(precision="bf16").to_dict())  # config.json round trip
    assert again.cache_dtype == "bfloat16"


# ------------------------------------------------------------------ bf16 in every regime
def _record_conv_dtypes(monkeypatch) -> list[torch.dtype]:
    """Every Conv2d output dtype from the moment the run directory is claimed (training,
    the frozen prefix, cache writes, evaluation; not the fp32 build of the run)."""
    seen: list[torch.dtype] = []
    orig = schedule.regime_of

    def hook(module, args, out):
        if isinstance(module, torch.nn.Conv2d):
            seen.append(out.dtype)

    def spy_of(cfg):
        regime = orig(cfg)

        def spy(*a, **kw):
            h = torch.nn.modules.module.register_module_forward_hook(hook)
            try:
                return regime(*a, **kw)
            finally:
                h.remove()
        return spy
    monkeypatch.setattr(schedule, "regime_of", spy_of)
    return seen


def _all_float32(run_dir: Path) -> None:
    files = sorted((run_dir / "modules").glob("*.safetensors"))
    assert files
    for f in files:
        for name, t in load_file(str(f)).items():
            assert not t.is_floating_point() or t.dtype == torch.float32, (f.name, name, t.dtype)


@pytest.mark.parametrize("kw", [dict(mode="e2e"), dict(mode="parallel"),
                                dict(mode="sequential"), dict(mode="multilap", epochs=2, laps=2),
                                dict(mode="sequential", in_memory=True)],
                         ids=["e2e", "parallel", "sequential", "multilap", "in-memory"])
def test_bf16_trains_each_regime_with_every_forward_in_bf16(kw, tmp_path, monkeypatch):
    seen = _record_conv_dtypes(monkeypatch)
    m = train(small(**kw), tmp_path / "run")
    assert m["precision"] == "bf16"
    assert seen and set(seen) == {torch.bfloat16}, set(seen)  # no forward left in float32
    assert all(mod["train_loss"] == mod["train_loss"] for mod in m["modules"])  # not NaN
    _all_float32(tmp_path / "run")  # fp32 master weights


def test_fp32_run_records_its_precision_and_runs_in_float32(tmp_path, monkeypatch):
    seen = _record_conv_dtypes(monkeypatch)
    m = train(small(mode="sequential", precision="fp32"), tmp_path / "run")
    assert m["precision"] == "fp32" and set(seen) == {torch.float32}


def _cache_writes(monkeypatch) -> list[str]:
    dtypes = []
    orig = out_of_core.CacheWriter.close

    def close(self, *a, **kw):
        dtypes.append(self.dtype)
        return orig(self, *a, **kw)
    monkeypatch.setattr(out_of_core.CacheWriter, "close", close)
    return dtypes


@pytest.mark.parametrize("extra,expected", [([], "bfloat16"),
                                            (["--cache-dtype", "float16"], "float16")])
def test_the_bf16_cache_is_bfloat16_unless_told(extra, expected, tmp_path, monkeypatch):
    written = _cache_writes(monkeypatch)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", *TINY, "--mode", "sequential", "--precision", "bf16",
                                 *extra, "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert written and set(written) == {expected}
    assert json.loads((out / "config.json").read_text())["cache_dtype"] == expected


# ------------------------------------------------------------------ refusals
def test_fp16_on_cpu_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", *TINY, "--precision", "fp16", "--out", str(out)])
    check_one_line_exit_2(r, "--precision fp16 needs a CUDA device; on CPU use bf16")
    assert not out.exists()


def test_bf16_where_autocast_cannot_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_mod, "bf16_supported", lambda device: False)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", *TINY, "--precision", "bf16", "--out", str(out)])
    check_one_line_exit_2(r, "--precision bf16 is not supported")
    assert not out.exists()


def test_an_unknown_precision_is_refused():
    r = CliRunner().invoke(cli, ["train", *TINY, "--precision", "int8"])
    assert r.exit_code == 2 and "int8" in r.output
    with pytest.raises(UserError, match="--precision must be one of"):
        RunConfig(precision="fp64")


# ------------------------------------------------------------------ losses in float32
def test_the_transport_term_of_a_bf16_residue_is_float32_with_the_same_gradient():
    g = torch.Generator().manual_seed(0)
    r32 = torch.randn(4, 3, 5, 5, generator=g)
    for scaling in ("mean", "sample"):
        r = r32.to(torch.bfloat16).requires_grad_(True)
        w = transport_cost([r], scaling)
        assert w.dtype == torch.float32
        w.backward()
        ref = r.detach().float().requires_grad_(True)
        transport_cost([ref], scaling).backward()
        assert r.grad.dtype == torch.bfloat16
        torch.testing.assert_close(w, transport_cost([ref.detach()], scaling))
        torch.testing.assert_close(r.grad.float(), ref.grad, rtol=1e-2, atol=1e-6)


def test_a_bf16_step_with_recompute_equals_the_step_without():
    """torch's checkpoint recomputes under the forward's autocast: same loss, same update."""
    cfg = small(mode="parallel", modules=1)
    got = []
    for spec in ("none", "blocks"):
        run = build_run(cfg)
        st = run.stages[0].set_recompute(spec)
        tr = make_trainer(st, cfg, 0, 1, 10)
        x = run.data.normalize(run.data.train.rows(torch.arange(16)))
        (s,) = train_step([tr], x, run.data.train.y[:16], 0.0, "mean", "bf16")
        got.append(((s["loss"], s["transport"]), st.state_dict()))
    assert got[0][0] == got[1][0]
    for name, t in got[0][1].items():
        torch.testing.assert_close(got[1][1][name], t, msg=name)


# ------------------------------------------------------------------ the estimator
def _est_cfg(**kw) -> RunConfig:
    base = dict(data="synthetic", input_shape=(3, 32, 32), model="resnet20", modules=3,
                mode="sequential", batch_size=32, epochs=1, laps=1)
    return RunConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [dict(), dict(mode="e2e", modules=1),
                                dict(recompute="blocks")], ids=["sequential", "e2e", "recompute"])
def test_the_bf16_estimate_is_below_fp32_and_above_half_of_it(kw):
    fp32 = estimate_peak(_est_cfg(**kw), (3, 32, 32), 10)
    bf16 = estimate_peak(_est_cfg(precision="bf16", **kw), (3, 32, 32), 10)
    for name in ("train_step_bytes", "activations_bytes"):
        a, b = getattr(fp32, name), getattr(bf16, name)
        assert a / 2 < b < a, (name, a, b)
    assert bf16.params_bytes == fp32.params_bytes  # fp32 master weights
    assert bf16.optimizer_bytes == fp32.optimizer_bytes


@pytest.mark.parametrize("mode", ["parallel", "e2e"])
def test_the_simulated_bf16_step_peak_equals_the_real_one_under_cpu_autocast(mode):
    """As tests/budget/test_simulate.py for fp32: the meta simulation under `MetaAutocast` against
    the real `train_step` under `torch.autocast("cpu")`, both tracked by LiveBytes."""
    cfg = RunConfig(data="synthetic", input_shape=(3, 16, 16), synthetic_size=80,
                    model="resnet8", modules=2 if mode == "parallel" else 1, mode=mode,
                    batch_size=16, epochs=1, augment=False, precision="bf16")
    real, sim = real_and_simulated_step_peaks(cfg)
    assert sim == pytest.approx(real, rel=0.02, abs=4096)


def test_the_planner_passes_the_precision_through(monkeypatch):
    monkeypatch.setattr(planner, "runtime_baseline_bytes", lambda: 100 * MIB)  # no child
    cfg = RunConfig(precision="bf16", mode="sequential")
    assert "--precision bf16" in train_command(cfg)
    r = CliRunner().invoke(cli, ["plan", "--memory-budget", "64GiB", "--model", "kmresnet",
                                 "--width", "4", "--depth", "2", "--precision", "bf16"])
    assert r.exit_code == 0, r.output
    assert "--precision bf16" in r.output


# ------------------------------------------------------------------ resume
class _StopAfter:
    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.parametrize("mode", ["e2e", pytest.param("sequential", marks=pytest.mark.slow)])
def test_a_stopped_bf16_run_resumes_to_the_same_weights(mode, tmp_path):
    cfg = lambda: small(mode=mode, epochs=2)  # noqa: E731  (a fresh config each run)
    ref = tmp_path / "ref"
    train(cfg(), ref)
    run_dir = tmp_path / "run"
    with pytest.raises(Stopped):
        train(cfg(), run_dir, stop=_StopAfter(5))  # in epoch 2 of module 1 (4 steps an epoch)
    assert not (run_dir / "metrics.json").exists()
    m = resume(run_dir)
    assert m["precision"] == "bf16"
    for f in sorted((ref / "modules").glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(run_dir / "modules" / f.name))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (f.name, name)


# ------------------------------------------------------------------ CUDA (skipped without)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_trains_with_a_scaler_and_resumes(tmp_path):
    cfg = lambda: small(mode="sequential", epochs=2, device="cuda", precision="fp16")  # noqa: E731
    ref = tmp_path / "ref"
    m = train(cfg(), ref)
    assert m["precision"] == "fp16"
    _all_float32(ref)
    run_dir = tmp_path / "run"
    with pytest.raises(Stopped):
        train(cfg(), run_dir, stop=_StopAfter(5))
    resume(run_dir)
    for f in sorted((ref / "modules").glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(run_dir / "modules" / f.name))
        for name in a:
            torch.testing.assert_close(a[name], b[name], msg=name)


# ------------------------------------------------------------------ distributed (slow)
@pytest.mark.slow
def test_two_bf16_ranks_train_the_weights_of_one_bf16_process(tmp_path):
    """bf16 activations cross the ranks as bf16 (the p2p header carries the dtype): the
    ranks end with the single-process parallel run's weights."""
    from tests.regimes.test_distributed import torchrun  # the loopback launcher of the other tests
    ref = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): bf16 and channels-last CPU
    try:  # kernels sum differently at another thread count
        train(small(mode="parallel"), ref)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "two"
    p = torchrun(2, [*TINY, "--mode", "parallel", "--precision", "bf16", "--distributed",
                     "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["precision"] == "bf16"
    for f in sorted((ref / "modules").glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(out / "modules" / f.name))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
