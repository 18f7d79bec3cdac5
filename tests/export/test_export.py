"""ONNX export of trained prefixes (edgetrain/export/onnx_export.py), checked independently of it.

The PyTorch reference is rebuilt with `edgetrain.regimes.run.load_run`, the ONNX file is read
back with plain onnx / onnxruntime, so a bug in the exporter's own loader or checks would
show as a disagreement here.
"""
import json
from pathlib import Path
import re
import shutil
import subprocess
import sys

from click.testing import CliRunner
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from edgetrain import __version__  # noqa: E402
from edgetrain.cli import cli  # noqa: E402
from edgetrain.export import onnx_check as ex_check  # noqa: E402
from edgetrain.export import onnx_export as ex  # noqa: E402
from edgetrain.method.stage import Prefix
from edgetrain.regimes.run import load_run
from edgetrain.regimes.schedule import train
from tests.conftest import tiny_cfg  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny multilap run (2 modules) and its PyTorch reference rebuilt by load_run."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    metrics = train(tiny_cfg(), run_dir)
    return run_dir, metrics, load_run(run_dir)


@pytest.fixture(scope="module")
def exported(trained):
    """export_prefix at depth 1 and at the best depth: {depth arg: report}."""
    run_dir, _, _ = trained
    return {d: ex.export_prefix(run_dir, depth=d, out=run_dir.parent / f"d-{d}.onnx")
            for d in ("1", "best")}


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort(sess, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _depth(arg, metrics):
    return metrics["best_depth"] if arg == "best" else int(arg)


@pytest.mark.parametrize("arg", ["1", "best"])
def test_checker_passes_and_onnxruntime_agrees_with_pytorch(trained, exported, arg):
    run_dir, metrics, run = trained
    rep, k = exported[arg], _depth(arg, metrics)
    assert rep["depth"] == k
    onnx.checker.check_model(rep["path"], full_check=True)
    sess = _session(rep["path"])
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # symbolic batch axis
    ref = Prefix(run.stages[:k]).eval()
    data = run.data
    with torch.no_grad():
        for b in (1, 7):
            x = data.normalize(data.test.x[:b])
            assert (_ort(sess, x) - ref(x)).abs().max() <= 1e-4
        x = data.normalize(data.test.x[:])  # the whole test split, read from the pack
        got, want = _ort(sess, x).argmax(1), ref(x).argmax(1)
    assert torch.equal(got, want)  # same class on every test sample
    acc = int((got == data.test.y).sum()) / len(data.test)
    assert acc == pytest.approx(metrics["modules"][k - 1]["test_acc"], abs=1e-9)
    assert rep["prefix_test_acc"] == pytest.approx(acc, abs=1e-9)  # the recorded figure
    assert rep["class_disagreements"] == 0 and rep["n_check"] == ex_check.CHECK_SAMPLES
    assert rep["file_bytes"] == Path(rep["path"]).stat().st_size
    assert rep["whole_test_acc"] == metrics["modules"][-1]["test_acc"]


@pytest.mark.parametrize("arg", ["1", "best"])
def test_metadata_present_and_correct(trained, exported, arg):
    _, metrics, run = trained
    k = _depth(arg, metrics)
    meta = {p.key: p.value for p in onnx.load(exported[arg]["path"]).metadata_props}
    assert int(meta["depth"]) == k and int(meta["n_modules"]) == 2
    assert float(meta["val_acc"]) == metrics["modules"][k - 1]["val_acc"]
    assert float(meta["test_acc"]) == metrics["modules"][k - 1]["test_acc"]
    assert json.loads(meta["input_shape"]) == [1, 8, 8]
    assert json.loads(meta["mean"]) == run.data.mean and json.loads(meta["std"]) == run.data.std
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert meta["edgetrain_version"] == __version__
    assert meta["output"] == "logits" and json.loads(meta["output_shape"]) == [10]


def test_export_never_reads_the_data_set(trained, tmp_path, monkeypatch):
    """The ONNX Runtime check runs on inputs built from preprocessing.json alone."""
    import edgetrain.data.splits as splits  # the one door to every data set

    def no_data(*a, **kw):
        raise AssertionError("export opened the data set")

    monkeypatch.setattr(splits, "open_data", no_data)
    rep = ex.export_prefix(trained[0], depth="1", out=tmp_path / "p.onnx")
    assert rep["class_disagreements"] == 0 and rep["n_check"] == ex_check.CHECK_SAMPLES
    assert rep["check_max_abs_diff"] <= 1e-4


def test_check_inputs_follow_the_recorded_preprocessing(trained):
    from edgetrain.data.preprocess import read_preprocessing
    prep = read_preprocessing(trained[0])
    x = ex_check.check_inputs(prep, 7)
    assert x.shape == (7, *prep.input_shape) and x.dtype == torch.float32
    assert torch.equal(x, ex_check.check_inputs(prep, 7))  # fixed seed
    assert torch.equal(x[:1], ex_check.check_inputs(prep, 1))
    mean = torch.tensor(prep.mean).view(1, -1, 1, 1)
    std = torch.tensor(prep.std).view(1, -1, 1, 1)
    pixels = (x * std + mean) * 255  # back to the uint8 pixels they were made from
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3 and pixels.std() > 10


def test_file_carries_no_local_paths(exported):
    blob = Path(exported["1"]["path"]).read_bytes()
    assert str(Path(ex.__file__).parent).encode() not in blob  # exporter stack traces stripped


def test_features_only_through_cli_gives_the_module_output(trained, tmp_path):
    run_dir, metrics, run = trained
    out = tmp_path / "f.onnx"
    r = CliRunner().invoke(cli, ["export", str(run_dir), "--depth", "1", "--features-only",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    x = run.data.normalize(run.data.test.x[:7])
    with torch.no_grad():
        z = run.stages[0].eval().features(x)
    got = _ort(_session(out), x)
    assert got.shape == z.shape
    assert (got - z).abs().max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["output"] == "features" and json.loads(meta["output_shape"]) == list(z.shape[1:])
    # the printed table: the file's test accuracy next to the whole network's
    onnx_line = next(line for line in r.output.splitlines() if line.startswith("ONNX file"))
    whole_line = next(line for line in r.output.splitlines() if line.startswith("whole network"))
    assert float(onnx_line.split()[3]) == pytest.approx(metrics["modules"][0]["test_acc"], abs=1e-4)
    assert float(whole_line.split()[3]) == pytest.approx(metrics["modules"][-1]["test_acc"],
                                                         abs=1e-4)


def test_e2e_run_exports_its_single_module(tmp_path):
    run_dir = tmp_path / "e2e"
    metrics = train(tiny_cfg(mode="e2e", epochs=1), run_dir)
    rep = ex.export_prefix(run_dir)
    assert rep["depth"] == 1 and rep["n_modules"] == 1
    assert rep["prefix_weight_bytes"] == rep["whole_weight_bytes"]
    run = load_run(run_dir)
    x = run.data.normalize(run.data.test.x[:7])
    with torch.no_grad():
        want = Prefix(run.stages).eval()(x)
    assert (_ort(_session(rep["path"]), x) - want).abs().max() <= 1e-4
    assert rep["prefix_test_acc"] == pytest.approx(metrics["modules"][0]["test_acc"], abs=1e-9)
    # the installed script, in a real process: one line on stderr, exit 2
    exe = Path(sys.executable).parent / "edgetrain"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgetrain.cli"]
    p = subprocess.run([*cmd, "export", str(run_dir), "--depth", "2"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == "error: --depth must be between 1 and the run's 1 modules (got 2)"


def _without(run_dir: Path, dst: Path, rel: str) -> Path:
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("*.onnx"))
    (dst / rel).unlink()
    return dst


BAD = [
    (lambda run, tmp: ["/nonexistent/run"], "no run directory"),
    (lambda run, tmp: [run, "--depth", "0"], "--depth must be between 1"),
    (lambda run, tmp: [run, "--depth", "3"], "--depth must be between 1"),
    (lambda run, tmp: [run, "--depth", "two"], "--depth must be 'best'"),
    (lambda run, tmp: [run, "--out", "/proc/forbidden/p.onnx"], "cannot write"),
    (lambda run, tmp: [run, "--out", str(tmp / "p.txt")], "must name a .onnx file"),
    (lambda run, tmp: [run, "--out", str(tmp)], "directory"),
    (lambda run, tmp: [run, "--opset", "12"], "--opset must be between"),
    (lambda run, tmp: [run, "--atol", "0"], "--atol must be positive"),
    (lambda run, tmp: [str(_without(Path(run), tmp / "r", "modules/01.safetensors"))],
     "missing module files 01"),
    (lambda run, tmp: [str(_without(Path(run), tmp / "r", "metrics.json"))],
     "has not finished training"),
    (lambda run, tmp: [str(_without(Path(run), tmp / "r", "config.json"))], "no config.json"),
]


@pytest.mark.parametrize("make_args,needle", BAD)
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, make_args, needle):
    run_dir = trained[0]
    before = sorted(p.name for p in run_dir.iterdir())
    r = CliRunner().invoke(cli, ["export", *make_args(str(run_dir), tmp_path)])
    assert r.exit_code == 2, (r.output, r.exception)
    out = r.output.strip()
    assert len(out.splitlines()) == 1 and needle in out, out
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written
    assert not list(tmp_path.rglob("*.onnx"))


def test_missing_onnxruntime_names_the_extra(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    r = CliRunner().invoke(cli, ["export", str(trained[0])])
    assert r.exit_code == 2
    assert r.output.strip() == ("error: onnxruntime is not installed; "
                                "pip install edgetrain[export]")


def test_a_disagreeing_export_is_refused_and_nothing_written(trained, tmp_path, monkeypatch):
    """The check can fail: export a perturbed copy of the prefix, verify against the original."""
    import copy
    real = ex.export_onnx

    def perturbed(model, *a, **kw):
        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad.stages[-1].head[-1].bias += 1e-3
        return real(bad, *a, **kw)

    monkeypatch.setattr(ex, "export_onnx", perturbed)
    out = tmp_path / "bad.onnx"
    from edgetrain.export.onnx_check import ExportCheckFailed
    with pytest.raises(ExportCheckFailed, match="differs from PyTorch"):
        ex.export_prefix(trained[0], depth="1", out=out)
    assert not out.exists()


def _deploy_snippet() -> str:
    """The manual's ONNX Runtime example: the python block of docs/ that runs onnxruntime
    (docs/deploy.md; found by its content, so the page may be rewritten around it)."""
    for page in sorted(DOCS.rglob("*.md")):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            if "onnxruntime" in block and "images.npy" in block:
                return block
    raise AssertionError("no python block of docs/ runs onnxruntime on images.npy")


def test_deploy_page_snippet_classifies_like_pytorch(trained, exported, tmp_path, monkeypatch,
                                                     capsys):
    _, metrics, run = trained
    k = metrics["best_depth"]
    shutil.copy(exported["best"]["path"], tmp_path / "prefix.onnx")
    images = run.data.test.x[:20].numpy()  # uint8 (N, C, H, W)
    np.save(tmp_path / "images.npy", images)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_deploy_snippet(), "docs/deploy.md", "exec"), ns)
    with torch.no_grad():
        want = Prefix(run.stages[:k]).eval()(run.data.normalize(run.data.test.x[:20])).argmax(1)
    assert ns["logits"].argmax(axis=1).tolist() == want.tolist()
    assert capsys.readouterr().out.strip() == str([str(int(c)) for c in want])


# --------------------------------------------------------------------------- every model
def _calibrated_prefix(name: str, in_shape=(3, 16, 16)):
    """An untrained prefix (2 modules, tiny width) with BatchNorm statistics from random data.

    Without calibration an untrained deep net's outputs grow to ~1e4 and no absolute
    tolerance means anything.
    """
    from edgetrain.method.split import build_stages, split_depth
    from edgetrain.models import create_model
    torch.manual_seed(0)
    net = create_model(name, in_shape, 10, width=8)
    sample = torch.randn(32, *in_shape)
    stages = build_stages(net, split_depth(len(net.blocks), 2), "dgl", 10, sample[:2])
    model = Prefix(stages)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(sample)
    return model.eval()


def _all_models():
    from edgetrain.models import list_models
    return list_models()


@pytest.mark.slow
@pytest.mark.parametrize("name", _all_models())
def test_every_registered_model_exports_and_agrees(name):
    """Whole untrained network (both modules, last head) through export, checker and ORT.

    Tolerance: 1e-4, or twice float32 PyTorch's own distance from float64 PyTorch where
    that is larger (deep bottleneck ResNets at width 8 are ill-conditioned: measured 2.5e-4
    for resnet101, for PyTorch and ONNX Runtime alike).
    """
    model = _calibrated_prefix(name)
    x = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    proto = ex.export_onnx(model, x[:2], ex.DEFAULT_OPSET, "logits")
    onnx.checker.check_model(proto, full_check=True)
    sess = ex.ort_session(proto.SerializeToString())
    diffs = ex_check.batch_agreement(sess, model, [x[:1], x])
    for xb in (x[:1], x):
        tol = max(ex_check.ATOL, 2 * ex_check.float32_noise(model, xb))
        assert diffs[len(xb)] <= tol, (name, diffs, tol)
