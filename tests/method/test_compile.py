"""`--compile`: refused in one line where it cannot work; a compiled run trains as eager does."""
import json

from click.testing import CliRunner
import pytest

from edgetrain.cli import cli
from edgetrain.config import RunConfig
from edgetrain.method.compiled import cxx_compiler, inductor_cache_dir
from edgetrain.storage.rundir import config_hash

TRAIN = ["train", "--data", "digits", "--train-size", "200", "--model", "kmresnet", "--width",
         "8", "--depth", "2", "--modules", "2", "--epochs", "1", "--mode", "parallel", "--compile"]


def test_compile_without_a_cxx_compiler_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert cxx_compiler() is None
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, TRAIN + ["--out", str(out), "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "--compile needs a C++ compiler" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()


def test_compile_with_distributed_is_refused(tmp_path, monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29999").items():
        monkeypatch.setenv(k, v)  # as under torchrun: the refusal is the configuration's
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, TRAIN + ["--distributed", "--out", str(out)])
    assert r.exit_code == 2 and "--compile is not supported with --distributed" in r.output
    assert not out.exists()


def test_compile_is_left_out_of_the_config_hash_only_at_its_default():
    base = dict(data="digits", model="kmresnet", width=8, depth=2, modules=2)
    assert "compile" not in json.dumps(config_hash(RunConfig(**base)))
    assert config_hash(RunConfig(**base)) != config_hash(RunConfig(**base, compile=True))
    before = RunConfig(**base).to_dict()
    before.pop("compile")  # a 0.2.0 config.json has no `compile`: same hash as today's default
    assert config_hash(RunConfig.from_dict(before)) == config_hash(RunConfig(**base))


def test_inductor_cache_goes_under_the_data_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert inductor_cache_dir(str(tmp_path / "dc")) == tmp_path / "dc" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir(str(tmp_path / "dc")) == tmp_path / "mine"


@pytest.mark.slow
@pytest.mark.skipif(cxx_compiler() is None, reason="needs a C++ compiler")
def test_a_compiled_sequential_run_matches_eager_and_fills_the_cache(tmp_path, monkeypatch, tiny):
    from edgetrain.regimes.schedule import train
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    dc = tmp_path / "data-cache"
    eager = train(tiny(mode="sequential", depth=2, epochs=1, data_cache=str(dc)), tmp_path / "e")
    comp = train(tiny(mode="sequential", depth=2, epochs=1, data_cache=str(dc), compile=True),
                 tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["compile"] is True
    for a, b in zip(eager["modules"], comp["modules"]):  # kernels fused otherwise: rounding
        assert b["history"][-1]["train_loss"] == pytest.approx(a["history"][-1]["train_loss"],
                                                               rel=1e-3)
    assert any((dc / "inductor").rglob("*")), "the inductor cache is not under the data cache"
