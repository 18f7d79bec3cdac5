"""ExecuTorch programs (`edgetrain export --format pte`, `edgetrain predict FILE.pte`).

Skipped where the `executorch` extra is not installed. The programs are run here by
ExecuTorch's runtime directly and compared with the PyTorch prefix and the ONNX file.
"""
import json
from pathlib import Path

from click.testing import CliRunner
import numpy as np
import pytest
from PIL import Image
import torch

pytest.importorskip("executorch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from edgetrain.cli import cli  # noqa: E402
from edgetrain.export import onnx_export as ex  # noqa: E402
from edgetrain.export import pte  # noqa: E402
from edgetrain.method.stage import Prefix  # noqa: E402
from edgetrain.regimes.run import load_run  # noqa: E402
from edgetrain.regimes.schedule import train  # noqa: E402
from tests.conftest import tiny_cfg  # noqa: E402

ATOL_FP32 = 1e-4  # max |ExecuTorch fp32 - PyTorch| logits (XNNPACK reorders sums)
AGREE_INT8 = 0.95  # share of the test split where the int8 program picks PyTorch's class
N_IMAGES = 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pte") / "run"
    train(tiny_cfg(), d)
    return d


@pytest.fixture(scope="module")
def exported(run_dir):
    """One CLI export of the fp32 program, and the fp32 ONNX file."""
    res = CliRunner().invoke(cli, ["export", str(run_dir), "--format", "pte",
                                   "--out", str(run_dir.parent / "m.pte")])
    assert res.exit_code == 0, res.output
    onnx_rep = ex.export_prefix(run_dir, out=run_dir.parent / "m.onnx")
    return run_dir.parent / "m.pte", Path(onnx_rep["path"]), res.output


@pytest.fixture(scope="module")
def exported_int8(run_dir):
    """export_pte with --quantize int8 (XNNPACK's PT2E quantiser; a minute here): the report."""
    return pte.export_pte(run_dir, out=run_dir.parent / "q.pte", quantize="int8")


def _program_logits(path, x):
    from executorch.runtime import Runtime
    program = Runtime.get().load_program(Path(path).read_bytes())
    forward = program.load_method("forward")
    return torch.cat([forward.execute([r[None].contiguous()])[0] for r in x])


def _reference(run_dir, path):
    run = load_run(run_dir)
    k = int(pte.pte_runner(path)[0]["depth"])
    x = run.data.normalize(run.data.test.x[:])
    with torch.no_grad():
        return x, Prefix(run.stages[:k]).eval()(x)


def test_runtime_runs_the_program_like_pytorch(run_dir, exported):
    fp32, _, text = exported
    x, want = _reference(run_dir, fp32)
    got = _program_logits(fp32, x)
    assert (got - want).abs().max() <= ATOL_FP32
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert "same class 256/256" in text and "XNNPACK" in text


@pytest.mark.slow
def test_int8_program_is_smaller_and_agrees(run_dir, exported, exported_int8):
    progs = exported_int8["programs"]
    int8 = Path(progs["int8"]["path"])
    assert int8 == pte.int8_path(Path(progs["fp32"]["path"]))
    x, want = _reference(run_dir, int8)
    got8 = _program_logits(int8, x)
    assert (got8.argmax(1) == want.argmax(1)).float().mean() >= AGREE_INT8
    assert int8.stat().st_size < 0.75 * exported[0].stat().st_size
    assert pte.pte_runner(int8)[0]["format"] == "pte int8 xnnpack"


def test_program_is_delegated_to_xnnpack(exported):
    from executorch.exir._serialize._program import deserialize_pte_binary
    prog = deserialize_pte_binary(exported[0].read_bytes())
    prog = getattr(prog, "program", prog)
    plan = next(p for p in prog.execution_plan if p.name == "forward")
    assert [d.id for d in plan.delegates] and all(d.id == "XnnpackBackend" for d in plan.delegates)


def test_predict_pte_agrees_with_the_onnx_file(run_dir, exported, tmp_path):
    fp32, onnx_file, _ = exported
    x = load_run(run_dir).data.test.x[:N_IMAGES].numpy()
    for i, r in enumerate(x):
        Image.fromarray(r[0]).save(tmp_path / f"{i:03d}.png")

    def top1(model):
        res = CliRunner().invoke(cli, ["predict", str(model), str(tmp_path), "--json"])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.output)
        return doc["depth"], [p["top"][0]["class"] for p in doc["predictions"]]
    d_onnx, want = top1(onnx_file)
    d_pte, got = top1(fp32)
    assert d_pte == d_onnx and got == want


def test_metadata_travels_in_the_program(run_dir, exported):
    meta, _ = pte.pte_runner(exported[0])
    prep = json.loads((run_dir / "preprocessing.json").read_text())
    assert json.loads(meta["input_shape"]) == prep["input_shape"]
    assert json.loads(meta["class_names"]) == prep["class_names"]
    assert np.allclose(json.loads(meta["mean"]), prep["mean"])
    assert meta["format"] == "pte fp32 xnnpack"


def test_a_wrong_suffix_is_refused_before_work(run_dir, tmp_path):
    res = CliRunner().invoke(cli, ["export", str(run_dir), "--format", "pte",
                                   "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "--out must name a .pte file" in res.output
    assert not list(tmp_path.iterdir())
