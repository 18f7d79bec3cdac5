"""The built-in data sets: digits (scikit-learn), Fashion-MNIST (Debian's files), the
torchvision downloads (MNIST, CIFAR-10/100, STL-10) and synthetic.

Nothing here downloads in tests: `digits` ships inside scikit-learn, `fashion-mnist` is read
from Debian's `dataset-fashion-mnist` files when they exist, `synthetic` is random. The
torchvision sets download on first use.
"""
from __future__ import annotations

import gzip
from pathlib import Path
import struct

import numpy as np
import torch
import torchvision

from edgetrain.data import DATASETS
from edgetrain.data.splits import RawData
from edgetrain.errors import UserError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")




# --------------------------------------------------------------------------- loaders
@DATASETS.register("digits")
def _digits(**_) -> RawData:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    return RawData(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(d.target).long(),
                   None, None, [str(i) for i in range(10)], flip=False)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def fashion_available(root: Path = FASHION_DIR) -> bool:
    return (root / "train-images-idx3-ubyte.gz").is_file()


@DATASETS.register("fashion-mnist")
def _fashion(root: str | None = None, **_) -> RawData:
    base = Path(root) if root else FASHION_DIR
    if fashion_available(base):
        arr = {n: _read_idx(base / f"{n}-ubyte.gz") for n in
               ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
        return RawData(torch.from_numpy(arr["train-images-idx3"].copy()).unsqueeze(1),
                       torch.from_numpy(arr["train-labels-idx1"].astype(np.int64)),
                       torch.from_numpy(arr["t10k-images-idx3"].copy()).unsqueeze(1),
                       torch.from_numpy(arr["t10k-labels-idx1"].astype(np.int64)),
                       FASHION_CLASSES, flip=True)
    return _torchvision("FashionMNIST", root, flip=True)


def _torchvision(cls_name: str, root: str | None, flip: bool, split_kw: str = "train") -> RawData:
    cls = getattr(torchvision.datasets, cls_name)
    root = root or str(Path.home() / ".cache" / "edgetrain" / "data")
    try:
        if split_kw == "split":
            tr, te = cls(root, split="train", download=True), cls(root, split="test", download=True)
        else:
            tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as e:  # no network, bad mirror, disk full
        raise UserError(f"could not load {cls_name} into {root} ({type(e).__name__}: {e}); "
                        "use --data digits or fashion-mnist offline") from None
    return RawData(*_as_nchw(tr), *_as_nchw(te), list(getattr(tr, "classes", [])) or
                   [str(i) for i in range(int(_as_nchw(tr)[1].max()) + 1)], flip=flip)


def _as_nchw(ds) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(np.asarray(ds.data))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3):  # NHWC (CIFAR)
        x = x.permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(getattr(ds, "targets", getattr(ds, "labels", None)))).long()
    return x.contiguous(), y


@DATASETS.register("mnist")
def _mnist(root: str | None = None, **_) -> RawData:
    return _torchvision("MNIST", root, flip=False)


@DATASETS.register("cifar10")
def _cifar10(root: str | None = None, **_) -> RawData:
    return _torchvision("CIFAR10", root, flip=True)


@DATASETS.register("cifar100")
def _cifar100(root: str | None = None, **_) -> RawData:
    return _torchvision("CIFAR100", root, flip=True)


@DATASETS.register("stl10")
def _stl10(root: str | None = None, **_) -> RawData:
    return _torchvision("STL10", root, flip=True, split_kw="split")


@DATASETS.register("synthetic")
def _synthetic(input_shape=(3, 32, 32), synthetic_size: int = 512, num_classes: int = 10,
               **_) -> RawData:
    g = torch.Generator().manual_seed(0)
    n_test = max(synthetic_size // 4, 2)
    mk = lambda n: (torch.randint(0, 256, (n, *input_shape), generator=g, dtype=torch.uint8),  # noqa: E731
                    torch.randint(0, num_classes, (n,), generator=g))
    (a, b), (c, d) = mk(synthetic_size), mk(n_test)
    return RawData(a, b, c, d, [str(i) for i in range(num_classes)], flip=True)
