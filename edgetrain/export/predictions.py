"""What `edgetrain predict` prints, whatever runs the network: the image files named, the
top-k classes per image, the text and JSON forms. Imports no torch (numpy only), so the
predictor of an exported file (`edgetrain.export.model_file`) runs without PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path

import numpy as np

from edgetrain.data.folder import is_image_name
from edgetrain.errors import UserError

BATCH = 64  # images decoded and classified at once


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first

    def to_dict(self) -> dict:
        return {"file": self.file, "top": [{"class": c, "prob": p} for c, p in self.top]}


def image_files(paths: list[str | Path]) -> list[Path]:
    """The files named, and every image file under the folders named (sorted).

    Raises:
        UserError: a path that does not exist, or a folder without images.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(Path(d) / n for d, _, names in os.walk(p) for n in names
                           if is_image_name(n) and not n.startswith("."))
            if not found:
                raise UserError(f"no image file under {p}")
            files.extend(found)
        else:
            raise UserError(f"no such file or folder: {p}")
    if not files:
        raise UserError("give at least one image file or folder")
    return files


def check_top_k(top_k: int) -> None:
    """Raises UserError unless `top_k` >= 1."""
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1 (got {top_k})")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, classes) logits, computed in float64."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_predictions(files: list[Path], prob: np.ndarray, class_names: list[str], top_k: int
                    ) -> list[Prediction]:
    """One Prediction per file from its (classes,) probabilities: the `top_k` most likely
    (ties: the lower class index first), probabilities rounded to 6 decimals."""
    out = []
    for f, row in zip(files, prob):
        order = np.argsort(-row, kind="stable")[:min(top_k, len(class_names))]
        out.append(Prediction(str(f), [(class_names[j], round(float(row[j]), 6)) for j in order]))
    return out


def predictions_json(depth: int, preds: list[Prediction]) -> dict:
    """The document `edgetrain predict --json` prints."""
    return {"depth": depth, "predictions": [p.to_dict() for p in preds]}


def format_predictions(preds: list[Prediction]) -> str:
    """One line per image: the file, then class (probability) pairs."""
    return "\n".join(f"{p.file}\t" + "  ".join(f"{c} ({q:.3f})" for c, q in p.top) for p in preds)
