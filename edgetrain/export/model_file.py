"""Prediction from an exported file alone: `edgetrain predict MODEL.onnx|MODEL.pte IMAGES...`.

An exported file carries its preprocessing in its metadata (an ONNX file's metadata_props,
a .pte program's `edgetrain_metadata` method, both written by `deployment_metadata`): the
depth, the input shape, the resize policy, the per-channel mean and std and the class names.
Each image is decoded as the run decoded it (`edgetrain.data.folder.decode`), normalised,
and classified by ONNX Runtime or the ExecuTorch runtime; the output is that of
`edgetrain predict RUN_DIR`. For .onnx this file needs onnxruntime, numpy and Pillow and
imports no torch (a device without PyTorch predicts with it); a .pte needs the `executorch`
extra, whose Python runtime takes torch tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
from typing import Callable

import numpy as np

from edgetrain.data.folder import ResizePolicy, decode, open_image
from edgetrain.errors import UserError
from edgetrain.export.predictions import (BATCH, Prediction, check_top_k, image_files, softmax,
                                          top_predictions)

MODEL_SUFFIXES = (".onnx", ".pte")
ORT_HINT = "pip install onnxruntime (or edgetrain[predict])"
Runner = Callable[[np.ndarray], np.ndarray]  # float32 (B, C, H, W) -> logits (B, classes)


@dataclass(frozen=True)
class FileMeta:
    """The preprocessing and provenance an exported file carries."""

    depth: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: list[float]
    std: list[float]
    class_names: list[str]
    policy: ResizePolicy

    @classmethod
    def from_strings(cls, meta: dict[str, str], path: Path) -> "FileMeta":
        """Parse the string metadata of an exported file.

        Raises:
            UserError: a key missing or unreadable (a file edgetrain did not export), or a
                file whose output is features, not logits.
        """
        try:
            if meta.get("output", "logits") != "logits":
                raise UserError(f"{path} outputs features (--features-only): it does not classify")
            shape = tuple(int(v) for v in json.loads(meta["input_shape"]))
            policy = json.loads(meta.get("resize_policy", "null")) or {"size": shape[1:],
                                                                       "channels": shape[0]}
            return cls(int(meta["depth"]), shape, [float(v) for v in json.loads(meta["mean"])],
                       [float(v) for v in json.loads(meta["std"])],
                       [str(v) for v in json.loads(meta["class_names"])],
                       ResizePolicy(tuple(policy["size"]), int(policy["channels"]),
                                    policy.get("method", ResizePolicy.method)))
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path} carries no edgetrain preprocessing metadata ("
                            f"{type(e).__name__}: {e}); export it with `edgetrain export`"
                            ) from None

    def normalize(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return (rows.astype(np.float32) / np.float32(255.0) - mean) / std


def is_model_file(path: str | Path) -> bool:
    """Whether `path` names an exported model file (by its suffix) rather than a run directory."""
    return Path(path).suffix.lower() in MODEL_SUFFIXES and not Path(path).is_dir()


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"onnxruntime is not installed; {ORT_HINT}") from None
    return onnxruntime


def onnx_runner(path: Path, threads: int | None = None) -> tuple[dict[str, str], Runner]:
    """(metadata, runner) of an ONNX file on ONNX Runtime's CPU provider.

    Raises:
        UserError: onnxruntime missing, or it cannot load the file.
    """
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"onnxruntime cannot load {path}: {first}") from None
    name = sess.get_inputs()[0].name
    return dict(sess.get_modelmeta().custom_metadata_map), lambda x: sess.run(None, {name: x})[0]


def open_model_file(path: Path) -> tuple[FileMeta, Runner]:
    """The metadata and runner of an exported .onnx or .pte file.

    Raises:
        UserError: no such file, another suffix, no metadata, the runtime missing.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such model file: {path}")
    if path.suffix.lower() == ".onnx":
        meta, run = onnx_runner(path)
    elif path.suffix.lower() == ".pte":
        from edgetrain.export.pte import pte_runner  # imports torch and executorch: deferred
        meta, run = pte_runner(path)
    else:
        raise UserError(f"{path}: a model file is .onnx or .pte")
    return FileMeta.from_strings(meta, path), run


def check_depth(depth: int | str, meta: FileMeta, path: Path) -> None:
    """'best' or the file's own depth; the file holds one prefix only.

    Raises:
        UserError: another depth.
    """
    if str(depth).strip().lower() not in ("best", str(meta.depth)):
        raise UserError(f"{path} holds the prefix of depth {meta.depth}; --depth {depth} "
                        "needs an export of that depth")


def predict_file(model_file: Path, paths: list[str | Path], depth: int | str = "best",
                 top_k: int = 5) -> tuple[int, list[Prediction]]:
    """Classify image files with an exported prefix, reading nothing but the file.

    Args:
        model_file: an .onnx (float32 or int8) or .pte file written by `edgetrain export`.
        paths: image files and folders (every image under a folder, sorted).
        depth: 'best' or the file's depth (anything else is refused).
        top_k: how many classes to report per image (capped at the number of classes).
    Returns:
        (the file's depth, one Prediction per image, in file order).
    Raises:
        UserError: a bad file, depth or top-k; a missing path; a file that is not an image.
    """
    check_top_k(top_k)
    files = image_files(paths)
    meta, run = open_model_file(Path(model_file))
    check_depth(depth, meta, Path(model_file))
    out = []
    for i in range(0, len(files), BATCH):
        chunk = files[i:i + BATCH]
        for f in chunk:  # a file that is not an image is named before anything is decoded
            open_image(f).close()
        rows = np.stack([decode(f, meta.policy) for f in chunk])  # (B, C, H, W) uint8
        out.extend(top_predictions(chunk, softmax(run(meta.normalize(rows))), meta.class_names,
                                   top_k))
    return meta.depth, out
