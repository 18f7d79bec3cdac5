"""The inputs of `edgetrain export --quantize int8`: calibration and test images of a run.

Calibration comes from the run's training split (its pack, or the built-in set re-packed),
`CALIBRATION_SAMPLES` rows drawn with a fixed seed; `--calibration PATH` (image files or a
folder) replaces it when the pack is gone. The test split, when the data can be read, gives
the fp32 vs int8 accuracy; otherwise the comparison runs on the calibration images alone.
This file reads data and calls `edgetrain.export.quantize`; it does not export.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetrain.config import RunConfig
from edgetrain.data.preprocess import Preprocessing
from edgetrain.errors import UserError
from edgetrain.export.predictions import image_files
from edgetrain.export.quantize import CALIBRATION_SAMPLES, compare, quantize_int8
from edgetrain.regimes.run import load_data

CALIBRATION_SEED = 0
QUANTIZE_CHOICES = ("none", "int8")


@dataclass
class QuantInputs:
    calibration: np.ndarray  # normalised float32 (N, C, H, W)
    source: str  # where the calibration images came from
    test_x: np.ndarray | None  # the test split, normalised; None: the data is gone
    test_y: np.ndarray | None


def int8_path(out: Path) -> Path:
    """The int8 file beside the float32 one: prefix-depth3.onnx -> prefix-depth3-int8.onnx."""
    return out.with_name(f"{out.stem}-int8{out.suffix}")


def seeded_rows(n: int, k: int) -> torch.Tensor:
    """`min(n, k)` distinct positions of 0..n-1, drawn with CALIBRATION_SEED, sorted."""
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    return torch.randperm(n, generator=g)[:min(n, k)].sort().values


def folder_calibration(paths: Path, prep: Preprocessing) -> np.ndarray:
    """Normalised inputs from image files or a folder (CALIBRATION_SAMPLES of them at most).

    Raises:
        UserError: a missing path, no image, a file that is not an image.
    """
    files = image_files([paths])
    pick = seeded_rows(len(files), CALIBRATION_SAMPLES).tolist()
    rows = torch.from_numpy(np.stack([prep.image_row(files[i]) for i in pick]))
    return prep.normalize(rows).numpy()


def read_data(cfg: RunConfig):
    """The run's splits, or None where they cannot be read (an image folder and its pack
    gone, a torchvision set that would have to be downloaded offline)."""
    try:
        return load_data(cfg, gone_folder=True)
    except (UserError, OSError):
        return None


def test_inputs(data, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray] | None:
    """The test split normalised, and its labels; None without data."""
    if data is None:
        return None
    return prep.normalize(data.test.x[:]).numpy(), data.test.y.long().numpy()


def quant_inputs(cfg: RunConfig, prep: Preprocessing, calibration: Path | None) -> QuantInputs:
    """Calibration and test inputs, read before anything is written.

    Raises:
        UserError: the data gone and no --calibration, or a bad --calibration.
    """
    data = read_data(cfg)
    if data is None and calibration is None:
        raise UserError("--quantize int8 calibrates on the run's training images, which cannot "
                        "be read (the image folder and its pack are gone); give --calibration "
                        "FOLDER")
    if calibration is not None:
        calib, source = folder_calibration(Path(calibration), prep), str(calibration)
    else:
        rows = data.train.rows(seeded_rows(len(data.train), CALIBRATION_SAMPLES))
        calib, source = prep.normalize(rows).numpy(), "the run's training split"
    test = test_inputs(data, prep)
    return QuantInputs(calib, source, *(test or (None, None)))


def quantized(fp32: bytes, meta: dict[str, str], inputs: QuantInputs
              ) -> tuple[bytes | None, dict]:
    """The int8 model and its report; (None, report with `error`) where ONNX Runtime fails.

    The comparison runs on the test split, or on the calibration images when it is gone.
    """
    meta = {**meta, "quantization": "int8 static QDQ, per-channel weights (onnxruntime)",
            "calibration": inputs.source}
    try:
        int8, left = quantize_int8(fp32, inputs.calibration, meta)
    except Exception as e:  # onnxruntime.quantization raises many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, {"error": f"{type(e).__name__}: {first}"}
    x, y = ((inputs.test_x, inputs.test_y) if inputs.test_x is not None
            else (inputs.calibration, None))
    rep = compare(fp32, int8, x, y)
    rep.update(float_ops=left, calibration=inputs.source, n_calibration=len(inputs.calibration),
               compared_on="test split" if y is not None else "calibration images")
    return int8, rep
