"""Train / validation / test splits of a data set, carved deterministically, read from its pack.

Every data set (a built-in one or an image folder) is packed once into uint8 shards
(`edgetrain.data.pack`); a split is a list of row numbers into the pack plus the labels, and
its images are read batch by batch (`Split.rows`), never held whole in memory. Splits are
carved as train / val / test (validation from the whole training split, stratified, before
any `train_size` subset) and normalised per batch. `preview_splits` carves the same splits
from the labels alone, before a pack is written (what the planner counts, issue #21).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Callable

import torch

from edgetrain.data import DATASETS
from edgetrain.data.pack import (LABEL_DTYPE, Pack, PackPreview, open_builtin_pack,
                                 open_folder_pack, open_gone_folder_pack, pack_summary,
                                 preview_builtin_pack, preview_folder_pack)
from edgetrain.data.preprocess import Preprocessing
from edgetrain.errors import UserError
from edgetrain.storage.cache import CacheReader

TEST_SPLIT_SEED = 1234  # the carved test split never depends on the run's seed
INDEX_DTYPE = torch.int32  # row numbers held per image (half of int64's bytes)

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
    """Rows `index` of a pack split (uint8 (N, C, H, W), read on demand) and their labels.

    Both are held in 4 bytes per image (`INDEX_DTYPE`, `LABEL_DTYPE`); a batch's labels
    come out as int64 (`labels`), the dtype the losses take."""

    reader: CacheReader | None  # None: a preview's split, labels only (`DataPreview`)
    index: torch.Tensor  # (N,) INDEX_DTYPE row numbers in the pack split
    y: torch.Tensor  # (N,) LABEL_DTYPE

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images (len(idx), C, H, W) of split positions `idx`, read by pread."""
        return self.reader.raw_rows(self.index[idx])

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 labels (len(idx),) of split positions `idx`."""
        return self.y[idx].long()

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.reader, self.index[idx], self.y[idx])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.reader.shape)

    @property
    def x(self) -> "RowView":
        """Index-style access to the images (`split.x[:8]`): each access reads from disk."""
        return RowView(self)


@dataclass
class RowView:
    """`split.x[key]` reads rows `key` (int, slice, index tensor or list) from the pack."""

    split: Split

    def __getitem__(self, key) -> torch.Tensor:
        pos = torch.arange(len(self.split))[key]
        if pos.ndim == 0:
            return self.split.rows(pos.view(1))[0]
        return self.split.rows(pos)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.split.shape)


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
    source: dict = field(default_factory=dict)  # the pack: directory, counts, skipped files
    policy: dict | None = None  # the resize policy of an image folder

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.reader.shape)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
        return self.preprocessing().normalize(xb)

    def preprocessing(self) -> Preprocessing:
        """What a run stores to turn an image file into its input (`preprocessing.json`)."""
        return Preprocessing(self.name, self.input_shape, self.mean, self.std,
                             list(self.class_names), self.flip, self.policy, self.source)


# --------------------------------------------------------------------------- splitting
def stratified_indices(y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `n` indices with the class proportions of `y` (seeded); return (picked, rest)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    counts = torch.bincount(y)[classes].double()
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


def is_folder(name: str) -> bool:
    """An existing directory is an image folder, even where its name is a built-in's."""
    return os.path.isdir(name)


def open_data(name: str, *, input_shape=None, synthetic_size: int = 512, root: str | None = None,
              data_cache: str | None = None, image_size=None, channels: int | None = None,
              skip_bad_images: bool = False, gone_folder: bool = False) -> Pack:
    """The pack of data set `name` (a folder or a registered name), packed on first use.

    With `gone_folder`, an absolute path that is no longer a directory (a finished run's
    image folder, as config.json records it) is read from its pack alone.

    Raises:
        UserError: unknown data set, a bad folder, options that do not apply, a gone folder
            without its pack.
    """
    if is_folder(name):
        _check_folder_options(input_shape)
        return open_folder_pack(Path(name), data_cache, image_size, channels, skip_bad_images)
    if gone_folder and os.path.isabs(name) and name not in DATASETS.names():
        return open_gone_folder_pack(Path(name), data_cache, image_size, channels,
                                     skip_bad_images)
    options, load = _builtin(name, input_shape, synthetic_size, root, image_size, channels,
                             skip_bad_images)
    return open_builtin_pack(name, options, load, data_cache)


def preview_data(name: str, *, input_shape=None, synthetic_size: int = 512,
                 root: str | None = None, data_cache: str | None = None, image_size=None,
                 channels: int | None = None, skip_bad_images: bool = False) -> PackPreview:
    """What `open_data` with these arguments will find or write, without writing anything
    (`edgetrain.data.pack.preview_folder_pack`, `preview_builtin_pack`).

    Raises:
        UserError: as `open_data` before it writes.
    """
    if is_folder(name):
        _check_folder_options(input_shape)
        return preview_folder_pack(Path(name), data_cache, image_size, channels,
                                   skip_bad_images)
    options, load = _builtin(name, input_shape, synthetic_size, root, image_size, channels,
                             skip_bad_images)
    return preview_builtin_pack(name, options, load, data_cache)


def _check_folder_options(input_shape) -> None:
    if input_shape is not None:
        raise UserError("--input applies to --data synthetic only")


def _builtin(name: str, input_shape, synthetic_size: int, root: str | None, image_size,
             channels: int | None, skip_bad_images: bool) -> tuple[dict, Callable]:
    """(pack options, loader) of built-in data set `name`, its options checked."""
    if image_size is not None or channels is not None or skip_bad_images:
        raise UserError(f"--image-size, --channels and --skip-bad-images apply to image folders; "
                        f"{name!r} is not a directory")
    if name not in DATASETS.names() and (os.sep in name or name.startswith(".")):
        raise UserError(f"no image folder {name} (not a directory)")
    loader = DATASETS.lookup(name)
    kw = dict(root=root, synthetic_size=synthetic_size)
    if input_shape is not None:
        if name != "synthetic":
            raise UserError("--input applies to --data synthetic only")
        kw["input_shape"] = tuple(input_shape)
    options = {"synthetic_size": synthetic_size, "input_shape": kw.get("input_shape")} \
        if name == "synthetic" else {"root": root}
    return options, lambda: loader(**kw)


def load_splits(name: str, *, train_size: int | None = None, val_fraction: float = 0.1,
                test_size: int | None = None, seed: int = 0, input_shape=None,
                synthetic_size: int = 512, root: str | None = None,
                data_cache: str | None = None, image_size=None, channels: int | None = None,
                skip_bad_images: bool = False, flip: bool | None = None,
                classes=None, classes_by: str = "name", gone_folder: bool = False
                ) -> DataSplits:
    """Open data set `name`'s pack and carve validation (and, if absent, test) splits.

    `test_size` keeps a fixed stratified subset of the test split, the same for every seed.
    A folder's `val/` is its validation split; otherwise validation is carved from train.
    `classes` keeps those classes only (`select_classes`), before any split is carved.
    `gone_folder`: as `open_data`'s (a finished run's folder read from its pack alone).

    Raises:
        UserError: unknown data set or bad folder, or a train (test) size larger than the
            training (test) split.
    """
    pack = open_data(name, input_shape=input_shape, synthetic_size=synthetic_size, root=root,
                     data_cache=data_cache, image_size=image_size, channels=channels,
                     skip_bad_images=skip_bad_images, gone_folder=gone_folder)
    whole = {sp: _whole(pack, sp) for sp in pack.splits}
    class_names, (train, val, test) = carve_splits(
        name, pack.class_names, whole, train_size=train_size, val_fraction=val_fraction,
        test_size=test_size, seed=seed, classes=classes, classes_by=classes_by)
    mean, std = _channel_stats(train, min(4096, len(train)))
    return DataSplits(name, train, val, test, class_names, mean, std,
                      pack.info["flip"] if flip is None else flip, pack_summary(pack),
                      pack.info.get("policy"))


@dataclass
class DataPreview:
    """What `load_splits` will give, known before anything is written (the planner's view,
    issue #21): the splits' labels (`Split.reader` is None: there are no rows to read yet),
    the input shape, and the data pack (where it goes, the bytes opening it writes)."""

    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    input_shape: tuple[int, int, int]
    pack: PackPreview

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def preview_splits(name: str, *, train_size: int | None = None, val_fraction: float = 0.1,
                   test_size: int | None = None, seed: int = 0, input_shape=None,
                   synthetic_size: int = 512, root: str | None = None,
                   data_cache: str | None = None, image_size=None, channels: int | None = None,
                   skip_bad_images: bool = False, classes=None, classes_by: str = "name"
                   ) -> DataPreview:
    """`load_splits`'s splits (the same rows: the same carving of the same labels) without
    writing a pack or decoding an image (`preview_data`); the arguments are `load_splits`'s.

    Raises:
        UserError: as `load_splits`, but for images that only decoding finds corrupt.
    """
    pack = preview_data(name, input_shape=input_shape, synthetic_size=synthetic_size,
                        root=root, data_cache=data_cache, image_size=image_size,
                        channels=channels, skip_bad_images=skip_bad_images)
    whole = {sp: Split(None, torch.arange(len(y)), y) for sp, y in pack.labels.items()}
    class_names, (train, val, test) = carve_splits(
        name, pack.class_names, whole, train_size=train_size, val_fraction=val_fraction,
        test_size=test_size, seed=seed, classes=classes, classes_by=classes_by)
    return DataPreview(name, train, val, test, class_names, tuple(pack.shape), pack)


def carve_splits(name: str, class_names: list[str], whole: dict[str, Split], *,
                 train_size: int | None, val_fraction: float, test_size: int | None, seed: int,
                 classes, classes_by: str) -> tuple[list[str], tuple[Split, Split, Split]]:
    """(class names, (train, val, test)) carved from a pack's whole splits (see `load_splits`).

    Here, and only here, a data set is whole before splitting: its images (pack rows), its
    labels and its class names. A selection of classes applies to `train`/`test` here.
    """
    if classes is not None:  # issue #16: a subset of the classes, relabelled 0..n-1
        class_names, whole = select_classes(class_names, whole, classes, classes_by)
    train = whole["train"]
    if "test" not in whole:  # carve a fixed 20% test split
        test_idx, rest = stratified_indices(train.y, len(train) // 5, TEST_SPLIT_SEED)
        test, train = train.subset(test_idx), train.subset(rest)
    else:
        test = whole["test"]
    if test_size is not None:  # the same fixed subset for every seed
        test = _test_subset(test, test_size, name)
    if "val" in whole:
        val = whole["val"]
    else:
        n_val = int(round(len(train) * val_fraction))
        val_idx, rest = stratified_indices(train.y, n_val, seed + 1)
        val, train = train.subset(val_idx), train.subset(rest)
    if train_size is not None:
        if train_size > len(train):
            raise UserError(f"--train-size {train_size} is larger than the {len(train)} training "
                            f"samples of {name} left after the validation split")
        keep, _ = stratified_indices(train.y, train_size, seed + 2)
        train = train.subset(keep)
    return class_names, (train, val, test)


def _whole(pack: Pack, split: str) -> Split:
    ps = pack.splits[split]
    return Split(ps.reader, torch.arange(len(ps), dtype=INDEX_DTYPE), ps.labels)


def select_classes(class_names: list[str], splits: dict[str, Split], classes, by: str = "name"
                   ) -> tuple[list[str], dict[str, Split]]:
    """Keep `classes` (names, or integer indices when `by` is "index"), relabelled 0..n-1 in
    the order given; returns their names and the splits with only their rows.

    Raises:
        UserError: a name or index that the data set does not have (the error lists them).
    """
    names = list(class_names)
    if by == "index":
        try:
            idx = [int(c) for c in classes]
        except ValueError:
            raise UserError(f"--classes {','.join(map(str, classes))}: indices must be "
                            "integers with --classes-by index") from None
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
    lut = torch.full((len(names),), -1, dtype=LABEL_DTYPE)
    lut[torch.tensor(idx)] = torch.arange(len(idx), dtype=LABEL_DTYPE)
    kept = {}
    for name, sp in splits.items():
        m = lut[sp.y] >= 0
        kept[name] = Split(sp.reader, sp.index[m], lut[sp.y[m]])
    return [names[i] for i in idx], kept


def _test_subset(test: Split, n: int, name: str) -> Split:
    if n > len(test):
        raise UserError(f"--test-size {n} is larger than the {len(test)} test samples of {name}")
    keep, _ = stratified_indices(test.y, n, TEST_SPLIT_SEED + 1)
    return test.subset(keep)


def _channel_stats(train: Split, n: int, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the first `n` training rows, read `chunk` rows at a time
    (sums in float64): a bounded memory, whatever the image size (a 4,096-row float copy of
    3x224x224 images would be 2.4 GB)."""
    if n < 2:  # no spread to measure (an empty train split is refused by check_splits)
        c = train.rows(torch.arange(n)).shape[1]
        return [0.0] * c, [1.0] * c
    s1 = s2 = 0.0
    for a in range(0, n, chunk):
        x = train.rows(torch.arange(a, min(n, a + chunk))).to(torch.float64) / 255.0
        s1 = s1 + x.sum(dim=(0, 2, 3))
        s2 = s2 + x.square().sum(dim=(0, 2, 3))
    m = n * x.shape[2] * x.shape[3]
    mean = s1 / m
    std = ((s2 - m * mean * mean) / (m - 1)).clamp_min(0).sqrt().clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]




def check_splits(data: DataSplits | DataPreview, val_fraction: float) -> None:
    """Refuse splits a run cannot use: an empty train or test split, an empty validation
    split when one was asked for, or a class with no training sample (the same for a
    preview: only labels are looked at).

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
    counts = torch.bincount(data.train.y, minlength=data.num_classes)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        names = ", ".join(str(data.class_names[c]) for c in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"class {names}{more} of {data.name} has no training sample left after "
                        "the splits: lower --val-fraction or raise --train-size")
