"""Out-of-core scheduler: one module resident, cache == in-memory path, keys, rebuilds."""
import json

from click.testing import CliRunner
import pytest

from edgetrain.cli import cli
from edgetrain.errors import UserError
from edgetrain.regimes.out_of_core import OutOfCore
from edgetrain.regimes.run import build_run
from edgetrain.regimes.schedule import resume, train
from edgetrain.storage.codec import read_tensors, save_tensors
from tests.conftest import tiny_cfg


def _acc(m):
    return [(x["val_acc"], x["test_acc"]) for x in m["modules"]]


def test_cached_sequential_matches_in_memory_path_with_one_module_resident(tmp_path):
    kw = dict(mode="sequential", epochs=2, modules=3, depth=3, cache_dtype="float32", augment=False)
    ooc = train(tiny_cfg(**kw), tmp_path / "ooc")
    mem = train(tiny_cfg(**kw, in_memory=True), tmp_path / "mem")
    assert ooc["max_resident_modules"] == 1 and mem["max_resident_modules"] == 3
    # the cache pass (training caches 1 and 2) is timed, and is part of the training time
    assert 0 < ooc["timings"]["cache_pass_s"] < ooc["timings"]["train_s"]
    assert ooc["memory"]["cache_write"]["seconds"] >= ooc["timings"]["cache_pass_s"] * 0.99
    for (va, ta), (vb, tb) in zip(_acc(ooc), _acc(mem)):
        assert abs(va - vb) <= 0.005 and abs(ta - tb) <= 0.005
    assert [m["steps"] for m in ooc["modules"]] == [m["steps"] for m in mem["modules"]]
    assert not (tmp_path / "ooc" / "cache").exists()  # every cache removed once unneeded
    for f in (tmp_path / "ooc" / "modules").glob("*.safetensors"):
        assert not any(n.startswith("optim.") for n in read_tensors(f))
    state = json.loads((tmp_path / "ooc" / "state.json").read_text())
    assert state["finished"] and state["cursor"]["lap"] == 1


def test_multilap_keeps_one_module_resident(tmp_path):
    m = train(tiny_cfg(mode="multilap", epochs=2, laps=2, cache_views=2), tmp_path / "r")
    assert m["max_resident_modules"] == 1
    assert [x["epochs"] for x in m["modules"]] == [2, 2]
    assert m["best_test_acc"] > 0.5


def _ooc(tmp_path, **kw):
    run = build_run(tiny_cfg(mode="multilap", modules=3, depth=3, **kw))
    o = OutOfCore(run, tmp_path)
    o.start(None)
    return o


def test_a_cache_of_other_weights_is_never_read(tmp_path):
    o = _ooc(tmp_path)
    o.ensure_cache(1, ["train"])
    assert o._valid(1, "train")
    t = read_tensors(o.store.path(0))
    name = next(n for n in t if n.endswith("weight"))
    t[name] = t[name] + 1e-3  # module 0 changed (as in the next lap)
    save_tensors(o.store.path(0), t)
    assert not o._valid(1, "train")
    with pytest.raises(UserError, match="key mismatch"):
        o.open_cache(1, "train")


def test_corrupt_cache_is_rebuilt_bit_identically_from_the_module_store(tmp_path):
    o = _ooc(tmp_path, cache_views=2)
    o.ensure_cache(2, ["train"])
    assert not o.cache_dir(1, "train").exists()  # cache 1 removed once cache 2 was complete
    d = o.cache_dir(2, "train")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    shard = sorted(d.glob("shard-*"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    o.ensure_cache(2, ["train"])  # rebuilds cache 1 from raw data, then cache 2
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert o.store.max_resident == 1


def test_resume_refuses_tampered_config_other_version_and_e2e(tmp_path):
    run_dir = tmp_path / "r"
    train(tiny_cfg(mode="sequential", epochs=1), run_dir)
    assert resume(run_dir)["best_depth"] >= 1  # a finished run resumes to its metrics
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**cfg, "lr": 0.5}))
    with pytest.raises(UserError, match="config.json differs"):
        resume(run_dir)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    state = json.loads((run_dir / "state.json").read_text())
    (run_dir / "state.json").write_text(json.dumps({**state, "edgetrain_version": "0.0.1"}))
    with pytest.raises(UserError, match="edgetrain 0.0.1"):
        resume(run_dir)
    train(tiny_cfg(mode="e2e", epochs=1), tmp_path / "e")
    (tmp_path / "e" / "metrics.json").unlink()
    with pytest.raises(UserError, match="metrics.json is missing"):
        resume(tmp_path / "e")
    in_mem = tiny_cfg(mode="sequential", epochs=1, in_memory=True)
    train(in_mem, tmp_path / "m")
    (tmp_path / "m" / "metrics.json").unlink()
    with pytest.raises(UserError, match="does not checkpoint"):
        resume(tmp_path / "m")


def test_cli_resume_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no run to resume" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path), "--epochs", "3"])
    assert r.exit_code == 2 and "do not combine it with --epochs" in r.output
