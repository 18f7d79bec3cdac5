"""Inference on image files: `edgetrain predict RUN_DIR PATH...`.

Each image goes through the run's own preprocessing (`RUN_DIR/preprocessing.json`: resize
policy, channels, normalisation, class names) and the chosen prefix F_k o G_k; the result is
the top-k class names with their probabilities. Only the run directory is read, never the
training data. This file does not train or export.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgetrain.data.folder import open_image
from edgetrain.export.onnx_export import resolve_depth
from edgetrain.export.predictions import (  # noqa: F401  (format_predictions: re-exported)
    BATCH, Prediction, check_top_k, format_predictions, image_files, softmax, top_predictions)
from edgetrain.method.stage import Prefix
from edgetrain.regimes.run import load_run, read_finished_run


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
    check_top_k(top_k)
    files = image_files(paths)
    _, metrics = read_finished_run(Path(run_dir))
    k = resolve_depth(depth, metrics)
    run = load_run(Path(run_dir), torch.device("cpu"), depth=k, bounds=metrics.get("bounds"),
                   with_data=False)
    prep = run.data
    model = Prefix(run.stages[:k]).eval()
    out = []
    for i in range(0, len(files), BATCH):
        chunk = files[i:i + BATCH]
        for f in chunk:  # a file that is not an image is named before anything is decoded
            open_image(f).close()
        x = torch.from_numpy(np.stack([prep.image_row(f) for f in chunk]))  # (B, C, H, W) uint8
        with torch.no_grad():
            logits = model(prep.normalize(x)).numpy()  # (B, classes)
        out.extend(top_predictions(chunk, softmax(logits), prep.class_names, top_k))
    return k, out
