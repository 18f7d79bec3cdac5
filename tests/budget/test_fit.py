"""`edgetrain train --fit`: the options the user gave are never changed, nothing-fits is one
line, the chosen configuration round-trips through `--resume`, a CUDA profile without CUDA
is refused."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
import re

from click.testing import CliRunner
import numpy as np
from PIL import Image
import pytest
import torch

from edgetrain.budget import fit as fitmod
from edgetrain.budget import guard, planner
from edgetrain.budget.planner import PLANNED
from edgetrain.cli import cli
from edgetrain.config import RunConfig
from edgetrain.data.splits import load_splits, preview_splits
from edgetrain.errors import UserError
import edgetrain.regimes.out_of_core as ooc
from edgetrain.storage.cache import free_space_margin
from edgetrain.units import MIB, fmt_bytes

FIXABLE = ("mode", "modules", "split", "batch_size", "cache_dtype")
# a run whose every planned field differs from what the planner would pick unconstrained
GIVEN = dict(mode="multilap", modules=4, split="memory", batch_size=16, cache_dtype="float32")
BASE = dict(data="digits", train_size=200, model="kmresnet", width=4, depth=8, epochs=4,
            laps=2, lr=0.07, seed=3)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(planner, "estimate_peak", fake_predict)
    for mod in (planner, guard):
        monkeypatch.setattr(mod, "runtime_baseline_bytes", lambda: 100 * MIB)


def fake_predict(*args, **kw):
    """tests/budget/test_plan.py's fake estimator (imported late: that file imports this one)."""
    from tests.budget.test_plan import fake_predict as fake
    return fake(*args, **kw)


def _opts(**kw) -> dict:
    d = RunConfig()
    opts = {f.name: getattr(d, f.name) for f in dataclasses.fields(d)
            if f.name not in ("fit_record", "memory_budget", "transport")}
    return {**opts, "no_transport": False, **BASE, **kw}


@pytest.mark.parametrize("fixed", [set(c) for r in range(len(FIXABLE) + 1)
                                   for c in itertools.combinations(FIXABLE, r)],
                         ids=lambda s: "+".join(sorted(s)) or "none")
def test_given_options_are_never_changed(fake, tmp_path, fixed):
    """Every subset of the planned fields, given: each keeps its value; fields the planner
    never chooses (data, model, epochs, seed, lr, ...) keep theirs whatever was given."""
    given = set(BASE) | fixed | {"precision"}  # not given, --fit resolves auto (#29)
    opts = _opts(**{k: GIVEN[k] for k in fixed})
    cfg, text = fitmod.fit_config(opts, given, None, "2GiB", tmp_path)
    for k in fixed:
        assert getattr(cfg, k) == GIVEN[k], (k, text)
    for k in BASE:
        assert getattr(cfg, k) == BASE[k]
    assert cfg.memory_budget == 2 * 2**30 and cfg.fit_record["needed_bytes"] <= 2 * 2**30
    assert not ({f.name for f in dataclasses.fields(cfg)} - set(PLANNED) - {"fit_record"}) & {
        k for k in opts if k in RunConfig.__dataclass_fields__ and getattr(cfg, k) != opts[k]
        and k not in PLANNED and k != "memory_budget"}
    if not fixed:  # unconstrained, the rule picks e2e at the largest batch for this budget
        assert (cfg.mode, cfg.batch_size) == ("e2e", 64)
    if cfg.batch_size < 64 and "batch_size" not in fixed:
        assert "learning rate stays 0.07" in text


def test_one_epoch_plans_sequential_not_two_laps(fake, tmp_path):
    given = set(BASE) - {"laps"}
    for budget in ("300MiB", "200MiB"):
        cfg, _ = fitmod.fit_config(_opts(epochs=1), given, None, budget, tmp_path)
        assert cfg.mode != "multilap" and cfg.epochs == 1
    one = RunConfig(mode="e2e", epochs=1, laps=2)
    assert planner._laps(one, "multilap", set()) == ("sequential", 1)
    assert planner._laps(RunConfig(mode="e2e", epochs=4, laps=3), "multilap", set()) == (
        "multilap", 2)
    cfg, _ = fitmod.fit_config(_opts(epochs=1, mode="multilap"), given | {"mode"}, None,
                               "300MiB", tmp_path)
    assert (cfg.mode, cfg.laps) == ("multilap", 1)
    cfg, _ = fitmod.fit_config(_opts(epochs=1), given | {"laps"}, None, "200MiB", tmp_path)
    assert cfg.mode in ("e2e", "parallel")  # 2 laps given with 1 epoch: no multilap


def _one_line_exit_2(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    return lines[0]


def test_nothing_fits_is_one_line_naming_smallest_budget(fake, tmp_path):
    out = tmp_path / "run"
    base = [a for k, v in BASE.items() for a in ("--" + k.replace("_", "-"), str(v))]
    res = CliRunner().invoke(cli, ["train", "--fit", "--memory-budget", "120MiB", "--out", str(out),
                                   *base])
    line = _one_line_exit_2(res)
    assert "nothing fits in 120.00 MiB: the smallest budget that would fit is" in line
    assert re.search(r"closest candidate \((e2e|parallel|sequential|multilap), K=\d+", line)
    assert not out.exists()
    needed = int(line.split("(")[1].split()[0])  # the exact byte count it names
    cfg, _ = fitmod.fit_config(_opts(), set(BASE), None, str(needed), tmp_path)
    assert cfg.fit_record["needed_bytes"] == needed  # that budget does fit


def test_nothing_fits_on_disk(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(fitmod, "free_bytes", lambda d: 2**30)
    monkeypatch.setattr(planner, "disk_needed_bytes", lambda pred: 2**30 + 1)
    res = CliRunner().invoke(cli, ["train", "--fit", "--memory-budget", "2GiB", "--out",
                                   str(tmp_path / "run"), "--mode", "multilap"])
    assert "nothing fits on disk" in _one_line_exit_2(res)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, match", [
    ([], "--fit needs --device-profile NAME or --memory-budget SIZE"),
    (["--memory-budget", "2GiB", "--device-profile", "cpu-2gb"], "not both"),
])
def test_fit_errors_one_line(tmp_path, args, match):
    res = CliRunner().invoke(cli, ["train", "--fit", "--out", str(tmp_path / "r"), *args])
    assert match in _one_line_exit_2(res)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("fit", [["--fit"], []])
def test_cuda_profile_without_cuda_is_refused(tmp_path, fit):
    res = CliRunner().invoke(cli, ["train", *fit, "--device-profile", "jetson-orin-nano-8gb",
                                   "--out", str(tmp_path / "r")])
    assert "trains on CUDA, which is not available" in _one_line_exit_2(res)
    assert not (tmp_path / "r").exists()


def test_fit_run_round_trips_through_resume(tmp_path, monkeypatch):
    """A real --fit run (kept: mode multilap, epochs 2; chosen: K, split, batch, laps, cache
    dtype) is stopped after its first module; `--resume` finishes it from config.json alone."""
    out = tmp_path / "run"
    args = ["train", "--fit", "--memory-budget", "6GiB", "--out", str(out), "--no-progress",
            "--data", "digits", "--train-size", "160", "--model", "kmresnet", "--width", "4",
            "--depth", "2", "--mode", "multilap", "--epochs", "2", "--batch-size", "64"]
    real = ooc.OutOfCore.write_state

    def stop(self, lap, module, epoch):
        real(self, lap, module, epoch)
        if (lap, module, epoch) == (0, 1, 0):
            raise KeyboardInterrupt
    monkeypatch.setattr(ooc.OutOfCore, "write_state", stop)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 130, res.output
    assert "kept        batch_size=64, mode=multilap" in res.output
    chosen = json.loads((out / "config.json").read_text())
    assert (chosen["mode"], chosen["epochs"], chosen["batch_size"]) == ("multilap", 2, 64)
    assert chosen["laps"] == 2 and chosen["memory_budget"] == 6 * 2**30
    assert chosen["extra"]["fit"]["needed_bytes"] <= 6 * 2**30
    monkeypatch.setattr(ooc.OutOfCore, "write_state", real)
    res = CliRunner().invoke(cli, ["train", "--resume", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text()) == chosen
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_modules"] == chosen["modules"] and metrics["max_resident_modules"] == 1
    assert len((out / "log.jsonl").read_text().splitlines()) == chosen["modules"] * 2


def test_fit_with_train_modules_needs_k(tmp_path):
    from click.testing import CliRunner

    from edgetrain.cli import cli
    r = CliRunner().invoke(cli, ["train", "--fit", "--memory-budget", "2GiB", "--train-modules",
                                 "2:2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 2 and "needs -K" in r.output and len(r.output.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the data pack (#21)
def image_folder(root: Path, n: int = 30, hw: tuple[int, int] = (10, 14)) -> Path:
    """A tiny ImageFolder (train/ and test/, three classes) of random RGB PNGs of size hw."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("test" if i % 5 == 0 else "train") / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def _files_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@pytest.mark.parametrize("data", ["folder", "digits"])
def test_a_pack_not_there_counts_its_bytes_and_a_pack_there_counts_zero(tmp_path, data):
    """The preview writes nothing; the bytes it counts are what packing then writes (but for
    the digits of pack.json's statistics and timings); the splits are the ones loaded; once
    packed, the same data counts 0 bytes."""
    name = str(image_folder(tmp_path / "imgs")) if data == "folder" else "digits"
    dc = tmp_path / "dc"
    prev = preview_splits(name, data_cache=str(dc), train_size=20 if data == "folder" else 300)
    assert not dc.exists()
    rows = sum(len(y) for y in prev.pack.labels.values())
    assert rows == (30 if data == "folder" else 1797)
    assert prev.pack.write_bytes > rows * math.prod(prev.input_shape)
    assert prev.input_shape == ((3, 10, 14) if data == "folder" else (1, 8, 8))
    loaded = load_splits(name, data_cache=str(dc), train_size=20 if data == "folder" else 300)
    assert abs(_files_bytes(prev.pack.directory) - prev.pack.write_bytes) <= 64
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(prev, split).index, getattr(loaded, split).index)
        assert torch.equal(getattr(prev, split).y, getattr(loaded, split).y)
    assert prev.input_shape == loaded.input_shape and prev.class_names == loaded.class_names
    again = preview_splits(name, data_cache=str(dc))
    assert again.pack.write_bytes == 0 and again.pack.directory == prev.pack.directory


def test_a_folder_preview_follows_the_size_policy_without_decoding(tmp_path, monkeypatch):
    """The shape comes from --image-size and --channels, else from the image headers as
    packing reads them; no pixel is decoded and nothing is written."""
    root = image_folder(tmp_path / "imgs")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image"))
    sized = preview_splits(str(root), data_cache=str(tmp_path / "dc"), image_size=(6, 8),
                           channels=1)
    assert sized.input_shape == (1, 6, 8)
    headers = preview_splits(str(root), data_cache=str(tmp_path / "dc"))
    assert headers.input_shape == (3, 10, 14)
    assert sized.pack.directory != headers.pack.directory
    rows = 30 * (3 * 10 * 14 - 6 * 8)  # the rows' difference, beside manifests that differ little
    assert abs(headers.pack.write_bytes - sized.pack.write_bytes - rows) < 1024
    assert not (tmp_path / "dc").exists()


def _folder_args(root: Path, dc: Path) -> list[str]:
    return ["--data", str(root), "--data-cache", str(dc), "--model", "kmresnet", "--width", "4",
            "--depth", "2", "--epochs", "1"]


def test_a_pack_that_does_not_fit_its_data_cache_is_refused_before_anything_is_written(
        fake, tmp_path, monkeypatch):
    root, dc, out = image_folder(tmp_path / "imgs"), tmp_path / "dc", tmp_path / "run"
    monkeypatch.setattr(fitmod, "same_filesystem", lambda a, b: False)
    monkeypatch.setattr(fitmod, "free_bytes", lambda d: 1024 if Path(d) == dc else 2**40)
    res = CliRunner().invoke(cli, ["train", "--fit", "--memory-budget", "2GiB", "--out", str(out),
                                   *_folder_args(root, dc)])
    line = _one_line_exit_2(res)
    assert f"the data pack of {root} needs " in line
    assert f"in the data cache {dc}, which has 1.00 KiB free" in line and "--data-cache" in line
    assert not out.exists() and not dc.exists()


def test_one_file_system_counts_the_pack_and_the_caches_against_one_free_space(
        fake, tmp_path, monkeypatch):
    """Free space F that holds the pack (with the packer's margin) and holds the caches, but
    not both: refused on one file system, planned on two, planned on one with a byte more;
    once packed, the pack counts nothing and F holds the caches alone."""
    root, dc = image_folder(tmp_path / "imgs"), tmp_path / "dc"
    pack = preview_splits(str(root), data_cache=str(dc)).pack.write_bytes
    caches = pack + free_space_margin(pack) + MIB
    monkeypatch.setattr(planner, "disk_needed_bytes", lambda pred: caches)
    opts = _opts(data=str(root), data_cache=str(dc), train_size=None)
    given = (set(BASE) - {"train_size"}) | {"data_cache"}

    def fit(free: int, shared: bool):
        monkeypatch.setattr(fitmod, "free_bytes", lambda d: free)
        monkeypatch.setattr(fitmod, "same_filesystem", lambda a, b: shared)
        return fitmod.fit_config(opts, given, None, "2GiB", tmp_path / "run")

    with pytest.raises(UserError, match="nothing fits on disk: .* one file system with"):
        fit(caches + pack - 1, shared=True)
    cfg, text = fit(caches + pack - 1, shared=False)
    assert cfg.fit_record["data_pack_bytes"] == pack
    assert f"data pack   {fmt_bytes(pack)} to write once, in {dc}" in text
    cfg, text = fit(caches + pack, shared=True)
    assert "one file system with the data pack" in text
    assert not dc.exists()  # planning wrote nothing
    load_splits(str(root), data_cache=str(dc))  # packed: nothing left to write
    packed, text = fit(caches + pack - 1, shared=True)
    assert packed.fit_record["data_pack_bytes"] == 0 and "nothing to write" in text
    assert (packed.mode, packed.modules, packed.batch_size) == (cfg.mode, cfg.modules,
                                                                 cfg.batch_size)
    assert cfg.fit_record["written_bytes"] == packed.fit_record["written_bytes"] + pack


def test_fit_vs_measured_keep_runs_only_the_missing_rows(tmp_path, monkeypatch):
    """`benchmarks/fit_vs_measured.py --keep`: completed rows of the existing result stay (with
    the date each was measured), only the missing (profile, model) pairs run."""
    import json as _json

    from edgetrain.bench import fit_vs_measured as fvm
    row = {"profile": "cpu-2gb", "model": "resnet56", "input": "3x64x64", "budget_mib": 1792.0,
           "completed": True, "plan": None, "predicted_process_mib": 1.0,
           "planned_needed_mib": 2.0, "measured_peak_rss_mib": 1.0, "within_budget": True,
           "ratio_measured_to_predicted": 1.0, "wall_s": 1.0, "load_before": [0.0],
           "load_after": [0.0], "error": None, "measured_at": "earlier"}
    (tmp_path / "fit_vs_measured.json").write_text(_json.dumps({"rows": [row]}))
    ran = []

    def fake(profile, model, shape, tmp, env, timeout_s):
        ran.append((profile, model))
        return {**row, "profile": profile, "model": model}
    monkeypatch.setattr(fvm, "measure_row", fake)
    res = fvm.bench_fit_vs_measured(profiles=("cpu-2gb",), models=fvm.MODELS, out_dir=tmp_path,
                                    keep=True)
    assert ran == [("cpu-2gb", "resnet110")]
    assert [r["model"] for r in res["rows"]] == ["resnet56", "resnet110"]
    assert "resnet56: earlier" in (tmp_path / "fit_vs_measured.md").read_text()
