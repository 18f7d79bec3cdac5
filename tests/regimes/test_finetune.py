"""Fine-tuning (issue #16): `--init` from torchvision / edgetrain weights, `--train-modules`,
`--classes`, and every bad input as one line with exit code 2."""
from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys

from click.testing import CliRunner
import pytest
from safetensors.torch import load_file, save_file
import torch
import torchvision

from edgetrain.cli import cli
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.models import create_model
from edgetrain.regimes.run import build_run
from edgetrain.regimes.schedule import evaluate_run, resume, train
from tests.conftest import tiny_cfg
from tests.regimes.test_interrupt import assert_same


def random_resnet18(seed: int = 0) -> torchvision.models.ResNet:
    """A torchvision resnet18 with random weights and random BatchNorm statistics (standing
    in for a pretrained file: nothing is downloaded)."""
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(weights=None)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def tv_cfg(init: Path, **kw) -> RunConfig:
    base = dict(data="synthetic", input_shape=(3, 64, 64), synthetic_size=64, model="resnet18",
                modules=4, epochs=1, laps=1, mode="sequential", init=str(init), batch_size=8)
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory) -> tuple[Path, torchvision.models.ResNet]:
    m = random_resnet18()
    p = tmp_path_factory.mktemp("tv") / "resnet18.pt"
    torch.save(m.state_dict(), p)
    return p, m


def test_torchvision_resnet18_features_equal_up_to_layer4(tv_file):
    path, tv = tv_file
    run = build_run(tv_cfg(path), device=torch.device("cpu"))
    assert run.finetune["init"]["kind"] == "torchvision"
    assert run.finetune["init"]["skipped"] == ["fc.weight", "fc.bias"]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        run.net.eval()
        got, _ = run.net(x)
    assert got.shape == ref.shape == (3, 512, 2, 2)
    # channels-last modules on AVX-512 CPUs (#29) round differently from torchvision's NCHW
    assert (got - ref).abs().max().item() <= 5e-5


def test_torchvision_safetensors_source_loads_too(tv_file, tmp_path):
    path, tv = tv_file
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(st))
    run = build_run(tv_cfg(st), device=torch.device("cpu"))
    assert torch.equal(run.net.stem[0].weight, tv.conv1.weight)
    assert run.finetune["init"]["sha256"] != build_run(tv_cfg(path)).finetune["init"]["sha256"]


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def assert_one_line(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


TV_ARGS = ["--data", "synthetic", "--input", "3x64x64", "--synthetic-size", "64", "--model",
           "resnet18", "-K", "4", "--mode", "sequential", "--epochs", "1", "--no-progress"]


def test_one_renamed_key_is_a_one_line_error_and_nothing_is_written(tv_file, tmp_path):
    path, tv = tv_file
    sd = tv.state_dict()
    sd["layer2.0.convX.weight"] = sd.pop("layer2.0.conv1.weight")
    bad = tmp_path / "renamed.pt"
    torch.save(sd, bad)
    out = tmp_path / "run"
    res = invoke(["train", *TV_ARGS, "--init", str(bad), "--out", str(out)])
    line = assert_one_line(res, "missing: blocks.2.block.conv1.weight",
                           "unexpected: blocks.2.block.convX.weight", "--no-init-strict")
    assert "1 missing" in line and "1 unexpected" in line
    assert not out.exists()


def test_no_init_strict_loads_the_rest(tv_file, tmp_path):
    path, tv = tv_file
    sd = tv.state_dict()
    sd["layer2.0.convX.weight"] = sd.pop("layer2.0.conv1.weight")
    bad = tmp_path / "renamed.pt"
    torch.save(sd, bad)
    run = build_run(tv_cfg(bad, init_strict=False))
    rec = run.finetune["init"]
    assert rec["missing"] == ["blocks.2.block.conv1.weight"]
    assert torch.equal(run.net.blocks[7].block.conv2.weight, tv.layer4[1].conv2.weight)


class Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


@pytest.mark.parametrize("case,needles", [
    ("missing", ["no such file"]),
    ("code", ["weights_only"]),
    ("other-arch", ["does not fit this network"]),
    ("small-input", ["3 input channels", "ImageNet stem", "3x32x32"]),
    ("one-channel", ["3 input channels", "1x64x64"]),
])
def test_bad_init_sources(case, needles, tv_file, tmp_path):
    path, tv = tv_file
    args = list(TV_ARGS)
    if case == "missing":
        path = tmp_path / "nope.pt"
    elif case == "code":
        path = tmp_path / "evil.pt"
        torch.save({"w": Evil()}, path)
    elif case == "other-arch":  # a kmresnet's state dict into a resnet18
        net = create_model("kmresnet", (3, 64, 64), 10, width=8, depth=4)
        path = tmp_path / "km.pt"
        torch.save(net.state_dict(), path)
    elif case == "small-input":
        args[args.index("3x64x64")] = "3x32x32"
    else:
        args[args.index("3x64x64")] = "1x64x64"
    out = tmp_path / "run"
    assert_one_line(invoke(["train", *args, "--init", str(path), "--out", str(out)]), *needles)
    assert not out.exists()


@pytest.mark.parametrize("rng,needle", [("3:2", "empty or reversed"), ("0:1", "empty or reversed"),
                                        ("1:3", "goes past the 2 modules"), ("a:b", "A:B"),
                                        ("1:2:3", "A:B")])
def test_bad_train_module_ranges(rng, needle, tmp_path):
    out = tmp_path / "run"
    res = invoke(["train", "--train-size", "100", "-K", "2", "--train-modules", rng,
                  "--out", str(out), "--no-progress"])
    assert_one_line(res, needle)
    assert not out.exists()


def test_classes_subset_and_unknown_names():
    cfg = tiny_cfg(classes="7,3,5", train_size=None)
    data = build_run(cfg).data
    assert data.class_names == ["7", "3", "5"]
    assert set(data.train.y.tolist()) == set(data.test.y.tolist()) == {0, 1, 2}
    by_index = build_run(tiny_cfg(classes="7,3,5", classes_by="index", train_size=None)).data
    assert torch.equal(by_index.test.y, data.test.y)
    with pytest.raises(UserError, match="no such class; the classes are 0,1,2"):
        build_run(tiny_cfg(classes="3,cat"))
    with pytest.raises(UserError, match="no such class index"):
        build_run(tiny_cfg(classes="3,12", classes_by="index"))
    with pytest.raises(UserError, match="integer indices"):
        tiny_cfg(classes="a,b", classes_by="index")


def body(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A finished sequential digits run to `--init` from."""
    src = tmp_path_factory.mktemp("src") / "run"
    train(tiny_cfg(mode="sequential", train_size=100, test_size=60, epochs=1), src)
    return src


@pytest.mark.parametrize("mode", ["sequential", "multilap", "parallel", "e2e"])
def test_modules_outside_the_range_are_bit_identical(mode, tmp_path):
    cfg = tiny_cfg(mode=mode, train_modules=(2, 2), train_size=100, test_size=60)
    before = build_run(cfg)
    first = {k: v.clone() for k, v in before.stages[0].state_dict().items()}
    first_net = {k: v.clone() for k, v in before.net.state_dict().items()}
    last = {k: v.clone() for k, v in before.stages[-1].state_dict().items()}
    metrics = train(cfg, tmp_path / "run")
    assert metrics["train_modules"] == [2, 2]
    if mode == "e2e":  # one module file: the whole network; module 1 is stem + blocks 0..1
        got = load_file(str(tmp_path / "run/modules/00.safetensors"))
        frozen = [k for k in first_net if k.startswith(("stem.", "blocks.0.", "blocks.1."))]
        assert all(torch.equal(got[k], first_net[k]) for k in frozen)
        trained = [k for k in first_net if k.startswith("blocks.3.") and k.endswith("weight")]
        assert trained and any(not torch.equal(got[k], first_net[k]) for k in trained)
        return
    got0 = load_file(str(tmp_path / "run/modules/00.safetensors"))
    got1 = load_file(str(tmp_path / "run/modules/01.safetensors"))
    assert body(got0).keys() == body(first).keys()
    assert all(torch.equal(got0[k], first[k]) for k in body(first))  # BN statistics included
    assert any(not torch.equal(got0[k], first[k]) for k in first if k.startswith("head."))
    assert any(not torch.equal(got1[k], last[k]) for k in body(last))


def test_init_from_a_run_loads_heads_and_finetunes_the_last_module(source_run, tmp_path):
    src = source_run
    cfg = tiny_cfg(mode="multilap", train_size=100, test_size=60, init=str(src),
                   train_modules=(2, 2))
    run = build_run(cfg)
    assert run.finetune["init"]["heads"] == "loaded"
    want = load_file(str(src / "modules/00.safetensors"))
    assert all(torch.equal(run.stages[0].state_dict()[k], v) for k, v in want.items())
    out = tmp_path / "ft"
    metrics = train(cfg, out)
    assert metrics["init"]["sha256"] and Path(metrics["init"]["path"]) == src.resolve()
    got = load_file(str(out / "modules/00.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in want.items())  # frozen, loaded head too
    ev = evaluate_run(out)
    assert [m["test_acc"] for m in ev["modules"]] == [m["test_acc"] for m in metrics["modules"]]
    assert resume(out)["best_depth"] == metrics["best_depth"]
    # another class count: the heads are built new
    sub = build_run(tiny_cfg(mode="sequential", train_size=None, init=str(src), classes="0,1,2"))
    assert sub.finetune["init"]["heads"] == "new"


@pytest.mark.slow  # ONNX export and its ONNX Runtime check: ~45 s on the shared 2 cores
def test_export_of_a_finetuned_run(source_run, tmp_path):
    out = tmp_path / "ft"
    train(tiny_cfg(mode="sequential", train_size=100, test_size=60, epochs=1,
                   init=str(source_run), train_modules=(2, 2)), out)
    res = invoke(["export", str(out), "--depth", "2", "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.onnx").is_file()


def test_init_from_a_run_of_another_input_shape(source_run, tmp_path):
    src = source_run
    out = tmp_path / "run"
    res = invoke(["train", "--data", "synthetic", "--input", "1x16x16", "--model", "kmresnet",
                  "--width", "8", "--depth", "4", "-K", "2", "--init", str(src), "--out",
                  str(out), "--no-progress"])
    assert_one_line(res, "trained on 1x8x8 inputs, this one has 1x16x16")
    assert not out.exists()
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["init"] is None and cfg["train_modules"] is None


@pytest.mark.slow  # two multilap runs, one in a subprocess: ~40 s on the shared 2 cores
def test_interrupted_finetune_resumes_bit_identical(source_run, tmp_path):
    """A multilap `--init` run training only module 2, stopped by SIGINT in lap 2 (the frozen
    prefix's cache kept across laps), resumes to the same weights as an uninterrupted run."""
    args = ["--data", "digits", "--train-size", "100", "--test-size", "60", "--model",
            "kmresnet", "--width", "8", "--depth", "4", "-K", "2", "--mode", "multilap",
            "--epochs", "2", "--laps", "2", "--seed", "0", "--device", "cpu", "--no-progress",
            "--init", str(source_run), "--train-modules", "2:2"]
    ref = tmp_path / "ref"
    assert invoke(["train", *args, "--out", str(ref)]).exit_code == 0
    run_dir = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    # 2 steps per epoch; module 1 is wholly frozen (its head loaded): lap 1 trains module 2
    # for steps 1-2, lap 2 for steps 3-4
    p = subprocess.Popen([sys.executable, "-m", "tests.regimes.interrupt_driver", "4", "train", *args,
                          "--out", str(run_dir)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate("go\n", timeout=300)
    assert p.returncode == 128 + signal.SIGINT, err[-2000:]
    assert (run_dir / "cache" / "c01").is_dir()  # the frozen prefix's output, kept
    assert invoke(["train", "--resume", str(run_dir), "--no-progress"]).exit_code == 0
    assert_same(ref, run_dir)
