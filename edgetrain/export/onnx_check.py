"""The checks an exported ONNX prefix must pass before `edgetrain export` writes it.

ONNX Runtime must reproduce the PyTorch prefix: outputs within `ATOL` at the batch sizes of
`CHECK_BATCHES`, and the same class on each of `CHECK_SAMPLES` inputs (`verify`). The inputs
are built from the run directory alone (`check_inputs`: a fixed-seed batch of pixels drawn
around the recorded per-channel mean and std, in the recorded input shape, normalised as the
run normalises), so export never reads the data set. onnx, onnxscript and onnxruntime are
imported lazily (`optional_import`): they are the optional `export` extra.
"""
from __future__ import annotations

import copy

import torch

from edgetrain.errors import UserError

ATOL = 1e-4  # max |logit difference| accepted between ONNX Runtime and PyTorch
CHECK_BATCHES = (1, 7)
CHECK_SAMPLES = 256  # inputs whose classes ONNX Runtime and PyTorch must agree on
CHECK_SEED = 0
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


def check_inputs(prep, n: int, seed: int = CHECK_SEED) -> torch.Tensor:
    """`n` normalised float32 inputs (n, C, H, W) built from the run's preprocessing alone.

    Pixels are drawn per channel from N(mean, std) of the recorded training statistics
    (fixed seed), rounded and clipped to uint8 as an image would be, then normalised with
    `prep.normalize`: inputs in the range and scale the network was trained on, without the
    data set.
    """
    g = torch.Generator().manual_seed(seed)
    c = len(prep.mean)
    mean = torch.tensor(prep.mean, dtype=torch.float64).view(1, c, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float64).view(1, c, 1, 1)
    z = torch.randn(n, *prep.input_shape, generator=g, dtype=torch.float64)
    pixels = (255.0 * (mean + std * z)).round().clamp(0, 255).to(torch.uint8)  # (n, C, H, W)
    return prep.normalize(pixels)


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
def class_agreement(sess, model: torch.nn.Module, head: torch.nn.Module | None,
                    x: torch.Tensor) -> dict:
    """ONNX Runtime and PyTorch classes on the inputs `x` (one batch).

    `head` turns exported features into logits (for --features-only), else None.
    """
    got, want = _ort_run(sess, x), model(x)
    worst = float((got - want).abs().max())
    if head is not None:
        got, want = head(got), head(want)
    disagree = int((got.argmax(1) != want.argmax(1)).sum())
    return {"n_check": len(x), "class_disagreements": disagree, "check_max_abs_diff": worst}


@torch.no_grad()
def float32_noise(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Max |float32 - float64| of the PyTorch model's output on `x`: its own rounding noise."""
    ref = copy.deepcopy(model).double()
    return float((model(x).double() - ref(x.double())).abs().max())


def verify(sess, model: torch.nn.Module, head: torch.nn.Module | None, prep,
           atol: float = ATOL) -> dict:
    """Both checks of the module docstring on `check_inputs(prep, ...)`; raises
    ExportCheckFailed when one fails. `prep` is the run's `Preprocessing` (or anything with
    its input_shape, mean, std and normalize)."""
    inputs = [check_inputs(prep, b) for b in CHECK_BATCHES]
    diffs = batch_agreement(sess, model, inputs)
    bad = [x for x in inputs if not diffs[len(x)] <= atol]
    if bad:
        b = len(bad[0])
        raise ExportCheckFailed(
            f"onnxruntime differs from PyTorch by {diffs[b]:.3g} (> --atol {atol:g}) at batch "
            f"{b}, while float32 PyTorch itself is {float32_noise(model, bad[0]):.3g} from "
            "float64 (if that is as large, raise --atol); nothing written")
    agree = class_agreement(sess, model, head, check_inputs(prep, CHECK_SAMPLES))
    if agree["class_disagreements"]:
        raise ExportCheckFailed(f"onnxruntime predicts another class than PyTorch on "
                                f"{agree['class_disagreements']} of {agree['n_check']} check "
                                "inputs; nothing written")
    return {"max_abs_diff": {str(b): d for b, d in diffs.items()}, "atol": atol,
            "check_input": f"seed {CHECK_SEED}, pixels ~ N(recorded mean, std) per channel",
            **agree}
