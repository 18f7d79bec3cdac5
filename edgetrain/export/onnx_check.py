"""The checks an exported ONNX prefix must pass before `edgetrain export` writes it.

ONNX Runtime must reproduce the PyTorch prefix: logits within `ATOL` at the batch sizes of
`CHECK_BATCHES`, and the same class on every test sample (`verify`). onnx, onnxscript and
onnxruntime are imported lazily (`optional_import`): they are the optional `export` extra.
"""
from __future__ import annotations

import copy

import torch

from edgetrain.errors import UserError

ATOL = 1e-4  # max |logit difference| accepted between ONNX Runtime and PyTorch
CHECK_BATCHES = (1, 7)
EVAL_BATCH = 256
INSTALL_HINT = "pip install edgetrain[export]"


class ExportCheckFailed(UserError):
    """The exported file disagrees with the PyTorch prefix; nothing was written."""


def optional_import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise UserError(f"{name} is not installed; {INSTALL_HINT}") from None


def ort_session(model_bytes: bytes):
    """An ONNX Runtime CPU session on the serialised model.

    Raises:
        UserError: onnxruntime missing, or it cannot load the model (e.g. too new an opset).
    """
    ort = optional_import("onnxruntime")
    try:
        return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"onnxruntime {ort.__version__} cannot load the exported model: "
                        f"{first}") from None


def _ort_run(sess, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def first_samples(data, n: int) -> torch.Tensor:
    """The first `n` normalised test samples (repeated if the test split is smaller)."""
    idx = torch.arange(n) % len(data.test)
    return data.normalize(data.test.x[idx])


@torch.no_grad()
def batch_agreement(sess, model: torch.nn.Module, inputs: list[torch.Tensor]) -> dict[int, float]:
    """Max |ONNX Runtime - PyTorch| of the output for each input batch, keyed by batch size.

    Raises:
        ExportCheckFailed: the output shapes differ.
    """
    out = {}
    for x in inputs:
        got, want = _ort_run(sess, x), model(x)
        if got.shape != want.shape:
            raise ExportCheckFailed(f"onnxruntime output shape {tuple(got.shape)} differs from "
                                    f"PyTorch's {tuple(want.shape)} at batch {len(x)}")
        out[len(x)] = float((got - want).abs().max())
    return out


@torch.no_grad()
def split_agreement(sess, model: torch.nn.Module, head: torch.nn.Module | None, data) -> dict:
    """ONNX Runtime and PyTorch classes over the whole test split.

    `head` turns exported features into logits (for --features-only), else None.
    """
    hits = disagree = 0
    worst = 0.0
    for i in range(0, len(data.test), EVAL_BATCH):
        x = data.normalize(data.test.x[i:i + EVAL_BATCH])
        y = data.test.y[i:i + EVAL_BATCH]
        got, want = _ort_run(sess, x), model(x)
        worst = max(worst, float((got - want).abs().max()))
        if head is not None:
            got, want = head(got), head(want)
        hits += int((got.argmax(1) == y).sum())
        disagree += int((got.argmax(1) != want.argmax(1)).sum())
    n = len(data.test)
    return {"onnx_test_acc": hits / max(n, 1), "n_test": n, "class_disagreements": disagree,
            "test_max_abs_diff": worst}


@torch.no_grad()
def float32_noise(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Max |float32 - float64| of the PyTorch model's output on `x`: its own rounding noise."""
    ref = copy.deepcopy(model).double()
    return float((model(x).double() - ref(x.double())).abs().max())


def verify(sess, model: torch.nn.Module, head: torch.nn.Module | None, data,
           atol: float = ATOL) -> dict:
    """Both checks of the module docstring; raises ExportCheckFailed when one fails."""
    inputs = [first_samples(data, b) for b in CHECK_BATCHES]
    diffs = batch_agreement(sess, model, inputs)
    bad = [x for x in inputs if not diffs[len(x)] <= atol]
    if bad:
        b = len(bad[0])
        raise ExportCheckFailed(
            f"onnxruntime differs from PyTorch by {diffs[b]:.3g} (> --atol {atol:g}) at batch "
            f"{b}, while float32 PyTorch itself is {float32_noise(model, bad[0]):.3g} from "
            "float64 (if that is as large, raise --atol); nothing written")
    split = split_agreement(sess, model, head, data)
    if split["class_disagreements"]:
        raise ExportCheckFailed(f"onnxruntime predicts another class than PyTorch on "
                                f"{split['class_disagreements']} of {split['n_test']} test "
                                "samples; nothing written")
    return {"max_abs_diff": {str(b): d for b, d in diffs.items()}, "atol": atol, **split}
