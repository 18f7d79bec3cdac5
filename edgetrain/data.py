"""Dataset registry and batch iteration.

Every data set is loaded into uint8 tensors (N, C, H, W) plus int64 labels, split into
train / val / test, and normalised per batch (so the raw set costs one byte per pixel).
This file does not train anything and never downloads in tests: `digits` ships inside
scikit-learn, `fashion-mnist` is read from Debian's `dataset-fashion-mnist` files when they
exist, `synthetic` is random. The torchvision sets download on first use.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from edgetrain.errors import UserError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
TEST_SPLIT_SEED = 1234  # the carved test split never depends on the run's seed

_DATASETS: dict[str, Callable[..., "RawData"]] = {}


@dataclass
class RawData:
    """A data set as loaded: uint8 images (N, C, H, W), int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    class_names: list[str]
    flip: bool  # horizontal flips are label-preserving


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataSplits:
    """Train / validation / test splits plus what a model and an exporter need to know."""

    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    mean: list[float]
    std: list[float]
    flip: bool

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
        mean = torch.tensor(self.mean, device=xb.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=xb.device).view(1, -1, 1, 1)
        return (xb.float() / 255.0 - mean) / std


def register_dataset(name: str):
    def deco(fn):
        _DATASETS[name] = fn
        return fn
    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


# --------------------------------------------------------------------------- loaders
@register_dataset("digits")
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


@register_dataset("fashion-mnist")
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
    import torchvision
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


@register_dataset("mnist")
def _mnist(root: str | None = None, **_) -> RawData:
    return _torchvision("MNIST", root, flip=False)


@register_dataset("cifar10")
def _cifar10(root: str | None = None, **_) -> RawData:
    return _torchvision("CIFAR10", root, flip=True)


@register_dataset("cifar100")
def _cifar100(root: str | None = None, **_) -> RawData:
    return _torchvision("CIFAR100", root, flip=True)


@register_dataset("stl10")
def _stl10(root: str | None = None, **_) -> RawData:
    return _torchvision("STL10", root, flip=True, split_kw="split")


@register_dataset("synthetic")
def _synthetic(input_shape=(3, 32, 32), synthetic_size: int = 512, num_classes: int = 10,
               **_) -> RawData:
    g = torch.Generator().manual_seed(0)
    n_test = max(synthetic_size // 4, 2)
    mk = lambda n: (torch.randint(0, 256, (n, *input_shape), generator=g, dtype=torch.uint8),  # noqa: E731
                    torch.randint(0, num_classes, (n,), generator=g))
    (a, b), (c, d) = mk(synthetic_size), mk(n_test)
    return RawData(a, b, c, d, [str(i) for i in range(num_classes)], flip=True)


# --------------------------------------------------------------------------- splitting
def stratified_indices(y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `n` indices with the class proportions of `y` (seeded); return (picked, rest)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    counts = torch.stack([(y == c).sum() for c in classes]).double()
    quota = torch.floor(counts / counts.sum() * n).long()
    # hand out the rounding remainder to the largest fractional parts, deterministically
    frac = counts / counts.sum() * n - quota.double()
    for i in torch.argsort(frac, descending=True)[: n - int(quota.sum())]:
        quota[i] += 1
    picked = []
    for c, q in zip(classes, quota):
        idx = torch.nonzero(y == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[: int(q)]])
    picked = torch.sort(torch.cat(picked)).values
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[picked] = False
    return picked, torch.nonzero(mask).flatten()


def load_splits(name: str, *, train_size: int | None = None, val_fraction: float = 0.1,
                test_size: int | None = None, seed: int = 0, input_shape=None,
                synthetic_size: int = 512, root: str | None = None) -> DataSplits:
    """Load data set `name` and carve validation (and, if absent, test) splits.

    `test_size` keeps a fixed stratified subset of the test split, the same for every seed.

    Raises:
        UserError: unknown data set, or a train (test) size larger than the training (test) split.
    """
    if name not in _DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(list_datasets())}")
    kw = dict(root=root, synthetic_size=synthetic_size)
    if input_shape is not None:
        if name != "synthetic":
            raise UserError("--input applies to --data synthetic only")
        kw["input_shape"] = tuple(input_shape)
    raw = _DATASETS[name](**kw)
    tx, ty = raw.train_x, raw.train_y
    if raw.test_x is None:  # carve a fixed 20% test split
        test_idx, rest = stratified_indices(ty, len(ty) // 5, TEST_SPLIT_SEED)
        test = Split(tx[test_idx], ty[test_idx])
        tx, ty = tx[rest], ty[rest]
    else:
        test = Split(raw.test_x, raw.test_y)
    if test_size is not None:  # the same fixed subset for every seed
        test = _test_subset(test, test_size, name)
    n_val = int(round(len(ty) * val_fraction))
    val_idx, rest = stratified_indices(ty, n_val, seed + 1)
    val = Split(tx[val_idx], ty[val_idx])
    tx, ty = tx[rest], ty[rest]
    if train_size is not None:
        if train_size > len(ty):
            raise UserError(f"--train-size {train_size} is larger than the {len(ty)} training "
                            f"samples of {name} left after the validation split")
        keep, _ = stratified_indices(ty, train_size, seed + 2)
        tx, ty = tx[keep], ty[keep]
    mean, std = _channel_stats(tx)
    return DataSplits(name, Split(tx, ty), val, test, raw.class_names, mean, std, raw.flip)


def _test_subset(test: Split, n: int, name: str) -> Split:
    if n > len(test):
        raise UserError(f"--test-size {n} is larger than the {len(test)} test samples of {name}")
    keep, _ = stratified_indices(test.y, n, TEST_SPLIT_SEED + 1)
    return Split(test.x[keep], test.y[keep])


def _channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    xf = x[:4096].float() / 255.0
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


# --------------------------------------------------------------------------- batches
def batch_indices(n: int, batch_size: int, shuffle: bool, gen: torch.Generator | None
                  ) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def augment(xb: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random translation by up to H/8 pixels (zero padding) and optional horizontal flip.

    Works on float batches (B, C, H, W) on any device; the randomness comes from `gen` (CPU)
    so it is reproducible and independent of the device.
    """
    b, _, h, w = xb.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(xb, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    if flip:
        mask = (torch.rand(b, generator=gen) < 0.5).to(xb.device)
        out = torch.where(mask.view(-1, 1, 1, 1), out.flip(-1), out)
    return out
