"""Train / validation / test splits of a registered data set, carved deterministically.

Every data set is loaded into uint8 tensors (N, C, H, W) plus int64 labels, split into
train / val / test (validation carved from the whole training split, stratified, before any
`train_size` subset), and normalised per batch (so the raw set costs one byte per pixel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetrain.data import DATASETS
from edgetrain.errors import UserError

TEST_SPLIT_SEED = 1234  # the carved test split never depends on the run's seed

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
                synthetic_size: int = 512, root: str | None = None,
                classes=None, classes_by: str = "name") -> DataSplits:
    """Load data set `name` and carve validation (and, if absent, test) splits.

    `test_size` keeps a fixed stratified subset of the test split, the same for every seed.
    `classes` keeps those classes only (`select_classes`), before any split is carved.

    Raises:
        UserError: unknown data set, or a train (test) size larger than the training (test) split.
    """
    loader = DATASETS.lookup(name)
    kw = dict(root=root, synthetic_size=synthetic_size)
    if input_shape is not None:
        if name != "synthetic":
            raise UserError("--input applies to --data synthetic only")
        kw["input_shape"] = tuple(input_shape)
    raw = loader(**kw)
    if classes is not None:  # issue #16: a subset of the classes, relabelled 0..n-1
        raw = select_classes(raw, classes, classes_by)
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


def select_classes(raw: RawData, classes, by: str = "name") -> RawData:
    """Keep `classes` (names, or integer indices when `by` is "index"), relabelled 0..n-1 in
    the order given; their names become the class names.

    Raises:
        UserError: a name or index that the data set does not have (the error lists them).
    """
    names = list(raw.class_names)
    if by == "index":
        idx = [int(c) for c in classes]
        bad = [str(i) for i in idx if not 0 <= i < len(names)]
        if bad:
            raise UserError(f"--classes {','.join(bad)}: no such class index; the data set has "
                            f"indices 0..{len(names) - 1}")
    else:
        bad = [c for c in classes if c not in names]
        if bad:
            raise UserError(f"--classes {','.join(bad)}: no such class; the classes are "
                            f"{','.join(names)} (or --classes-by index)")
        idx = [names.index(c) for c in classes]
    lut = torch.full((len(names),), -1, dtype=torch.long)
    lut[torch.tensor(idx)] = torch.arange(len(idx))

    def keep(x, y):
        if x is None:
            return None, None
        m = lut[y] >= 0
        return x[m], lut[y[m]]
    tx, ty = keep(raw.train_x, raw.train_y)
    ex, ey = keep(raw.test_x, raw.test_y)
    return RawData(tx, ty, ex, ey, [names[i] for i in idx], raw.flip)


def _test_subset(test: Split, n: int, name: str) -> Split:
    if n > len(test):
        raise UserError(f"--test-size {n} is larger than the {len(test)} test samples of {name}")
    keep, _ = stratified_indices(test.y, n, TEST_SPLIT_SEED + 1)
    return Split(test.x[keep], test.y[keep])


def _channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    if len(x) < 2:  # no spread to measure (an empty train split is refused by check_splits)
        return [0.0] * x.shape[1], [1.0] * x.shape[1]
    xf = x[:4096].float() / 255.0
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]




def check_splits(data: DataSplits, val_fraction: float) -> None:
    """Refuse splits a run cannot use: an empty train or test split, an empty validation
    split when one was asked for, or a class with no training sample.

    Raises:
        UserError: one line naming the split and the option that emptied it.
    """
    if len(data.train) == 0:
        raise UserError(f"no training sample of {data.name} is left after the validation split "
                        f"(--val-fraction {val_fraction}): lower --val-fraction")
    if len(data.test) == 0:
        raise UserError(f"the test split of {data.name} is empty")
    if val_fraction > 0 and len(data.val) == 0:
        raise UserError(f"--val-fraction {val_fraction} leaves no validation sample of "
                        f"{data.name}: raise it, or use 0 for no validation split")
    missing = sorted(set(range(data.num_classes)) - set(data.train.y.tolist()))
    if missing:
        names = ", ".join(str(data.class_names[c]) for c in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"class {names}{more} of {data.name} has no training sample left after "
                        "the splits: lower --val-fraction or raise --train-size")
