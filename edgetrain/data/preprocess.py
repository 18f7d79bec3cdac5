"""A run's preprocessing: what turns an image file into the network's input, stored with the run.

`RUN_DIR/preprocessing.json` holds the input shape, the resize policy, the per-channel mean
and std, the class names and the data source, so that `edgetrain predict` and `edgetrain
export` need the run directory alone. It is not the data (that is `edgetrain.data.splits`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
import json
from pathlib import Path

import numpy as np
import torch

from edgetrain.data.folder import ResizePolicy, decode
from edgetrain.errors import UserError

PREPROCESSING = "preprocessing.json"


@dataclass
class Preprocessing:
    """Everything between an image file and the network's input."""

    data: str  # the data set's name or the folder's absolute path
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: list[float]
    std: list[float]
    class_names: list[str]
    flip: bool = False
    policy: dict | None = None  # the resize policy of a folder (None: a built-in set)
    source: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
        mean = torch.tensor(self.mean, device=xb.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=xb.device).view(1, -1, 1, 1)
        return (xb.float() / 255.0 - mean) / std

    def resize_policy(self) -> ResizePolicy:
        """The folder's policy; for a built-in set, resize and crop to its input size."""
        c, h, w = self.input_shape
        return ResizePolicy((h, w), c)

    def image_row(self, path: Path) -> np.ndarray:
        """One image file as the uint8 (C, H, W) row the run was trained on.

        Raises:
            UserError: not an image, corrupt or truncated.
        """
        return decode(Path(path), self.resize_policy())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


def read_preprocessing(run_dir: Path) -> Preprocessing:
    """The preprocessing stored in a run directory.

    Raises:
        UserError: none stored (a run from before it was recorded) or unreadable.
    """
    path = Path(run_dir) / PREPROCESSING
    if not path.is_file():
        raise UserError(f"no {PREPROCESSING} in {run_dir}: the run predates it; "
                        "train it again to predict from the run directory alone")
    try:
        return Preprocessing.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
