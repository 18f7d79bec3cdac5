"""Inference on image files: `edgetrain predict RUN_DIR PATH...`.

Each image goes through the run's own preprocessing (`RUN_DIR/preprocessing.json`: resize
policy, channels, normalisation, class names) and the chosen prefix F_k o G_k; the result is
the top-k class names with their probabilities. Only the run directory is read, never the
training data. This file does not train or export.
"""
from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path

import numpy as np
import torch

from edgetrain.data.folder import is_image_name, open_image
from edgetrain.errors import UserError
from edgetrain.export.onnx_export import resolve_depth
from edgetrain.method.stage import Prefix
from edgetrain.regimes.run import load_run, read_finished_run

BATCH = 64


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


def predict(run_dir: Path, paths: list[str | Path], depth: int | str = "best", top_k: int = 5
            ) -> tuple[int, list[Prediction]]:
    """Classify image files with a finished run's prefix of depth `depth`.

    Args:
        run_dir: a finished run directory (its preprocessing.json and module files).
        paths: image files and folders (every image under a folder, sorted).
        depth: 'best' (chosen on validation) or 1..K.
        top_k: how many classes to report per image (capped at the number of classes).
    Returns:
        (depth used, one Prediction per image, in file order).
    Raises:
        UserError: bad run, depth or top-k; a missing path; a file that is not an image.
    """
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1 (got {top_k})")
    files = image_files(paths)
    _, metrics = read_finished_run(Path(run_dir))
    k = resolve_depth(depth, metrics)
    run = load_run(Path(run_dir), torch.device("cpu"), depth=k, bounds=metrics.get("bounds"),
                   with_data=False)
    prep = run.data
    model = Prefix(run.stages[:k]).eval()
    top_k = min(top_k, prep.num_classes)
    out = []
    for i in range(0, len(files), BATCH):
        chunk = files[i:i + BATCH]
        for f in chunk:  # a file that is not an image is named before anything is decoded
            open_image(f).close()
        x = torch.from_numpy(np.stack([prep.image_row(f) for f in chunk]))  # (B, C, H, W) uint8
        with torch.no_grad():
            prob = torch.softmax(model(prep.normalize(x)), dim=1)
        p, c = prob.topk(top_k, dim=1)
        for f, ps, cs in zip(chunk, p.tolist(), c.tolist()):
            out.append(Prediction(str(f), [(prep.class_names[j], round(q, 6))
                                           for j, q in zip(cs, ps)]))
    return k, out


def format_predictions(preds: list[Prediction]) -> str:
    """One line per image: the file, then class (probability) pairs."""
    return "\n".join(f"{p.file}\t" + "  ".join(f"{c} ({q:.3f})" for c, q in p.top) for p in preds)
