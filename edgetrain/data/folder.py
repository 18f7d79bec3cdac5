"""Image folders in the ImageFolder layout: scanning, the resize policy, decoding one image.

A folder holds one sub-folder per class (names sorted = class indices, as
`torchvision.datasets.ImageFolder`), or `train/` and `test/` (and optionally `val/`) each in
that layout. Files with an image extension (png, jpg, jpeg, bmp, webp, tif, tiff) are
images; every other file is ignored and counted. Rows are in sorted relative-path order.

The resize policy (`ResizePolicy`): with a size HxW, the image is scaled (bilinear, with
JPEG draft decoding at a reduced size first) so that its short side covers the target, then
centre-cropped to HxW; without a size, every image must already have one size. Channels are
1 (Pillow mode "L") or 3 ("RGB"); the default is 3 when any image is in a colour mode.

This file decodes; it does not store (that is `edgetrain.data.pack`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgetrain.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass(frozen=True)
class ResizePolicy:
    """How every image becomes a (C, H, W) uint8 row. Stored in the pack and the run."""

    size: tuple[int, int] | None  # (H, W); None: every image keeps its (common) size
    channels: int  # 1 or 3
    method: str = "resize-short-side-bilinear-centre-crop"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        return d


@dataclass
class FolderSplit:
    """The images of one split: relative paths (sorted), labels, (size, mtime_ns) per file."""

    files: list[str]
    labels: list[int]
    stats: list[tuple[int, int]]


@dataclass
class FolderScan:
    root: Path
    class_names: list[str]
    splits: dict[str, FolderSplit]  # "train", "test" and maybe "val"; or "all" to be carved
    ignored: int  # non-image files

    def sources(self) -> dict:
        """Every file with its size and mtime, per split (the pack's sources.json)."""
        return {name: [[f, *st] for f, st in zip(sp.files, sp.stats)]
                for name, sp in self.splits.items()}

    def sources_digest(self) -> str:
        """What decides whether a pack is stale: sha256 over every split's files with their
        size and mtime (`folder_digest` computes the same without a scan)."""
        return _sources_sha256((name, ((f, *st) for f, st in zip(sp.files, sp.stats)))
                               for name, sp in sorted(self.splits.items()))


def _sources_sha256(splits: Iterable[tuple[str, Iterable[tuple[str, int, int]]]]) -> str:
    """sha256 over (split name, its (relative path, size, mtime_ns) rows), streamed."""
    h = hashlib.sha256()
    for name, rows in splits:
        h.update(f"[{name}]\n".encode())
        for f, size, mtime in rows:
            h.update(f"{f}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


@dataclass
class _Layout:
    """A checked folder: its class names and, per split, the classes it has a folder for."""

    root: Path
    class_names: list[str]
    splits: dict[str, list[str]]  # "train", "val", "test" (this order) or "all"


def _layout(root: Path) -> _Layout:
    root = Path(root).resolve()
    if not root.is_dir():
        raise UserError(f"no image folder {root}")
    subs = _class_dirs(root)
    if "train" not in subs or "test" not in subs:
        _check_classes(root, subs)
        return _Layout(root, subs, {"all": subs})
    classes = _class_dirs(root / "train")
    _check_classes(root / "train", classes)
    splits = {}
    for name in [s for s in SPLIT_NAMES if s in subs]:
        extra = sorted(set(_class_dirs(root / name)) - set(classes))
        if extra:
            raise UserError(f"{root / name} has classes that {root / 'train'} lacks: "
                            f"{', '.join(extra[:5])}")
        splits[name] = [c for c in classes if (root / name / c).is_dir()]
    return _Layout(root, classes, splits)


def _split_rows(lay: _Layout, name: str, ignored: list[int]
                ) -> Iterator[tuple[str, int, int, int]]:
    """(path relative to the root, label, size, mtime_ns) of split `name`'s images, in sorted
    path order, one class folder at a time (a class's rows are contiguous in that order:
    its paths share the prefix "CLASS/"). Non-image files are counted in `ignored[0]`."""
    base = lay.root if name == "all" else lay.root / name
    prefix = "" if name == "all" else f"{name}/"
    label = {c: i for i, c in enumerate(lay.class_names)}
    for cls in sorted(lay.splits[name], key=lambda c: c + "/"):
        found = 0
        for rel, size, mtime in _walk_images(str(base / cls), f"{prefix}{cls}/", ignored):
            found += 1
            yield rel, label[cls], size, mtime
        if not found:
            raise UserError(f"class folder {base / cls} holds no image ({name}); remove it or "
                            f"add images ({', '.join(IMAGE_EXTS)})")


def _walk_images(directory: str, rel: str, ignored: list[int]) -> Iterator[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of the images under `directory` (`rel` is its path
    relative to the split) in sorted relative-path order: a folder's entries sorted with
    "NAME/" for sub-folders, each sub-folder walked at its place. The files are those
    `os.walk` finds: symlinked sub-folders are not entered, an unreadable folder is empty.
    Only the names of the folders being walked are held."""
    try:
        with os.scandir(directory) as it:
            keys = sorted(e.name + "/" if _is_dir(e) else e.name for e in it)
    except OSError:
        return
    for key in keys:
        path = os.path.join(directory, key.rstrip("/"))
        if key.endswith("/"):
            if not os.path.islink(path):
                yield from _walk_images(path, rel + key, ignored)
        elif not is_image_name(key) or key.startswith("."):
            ignored[0] += 1
        else:
            st = os.stat(path)
            yield rel + key, st.st_size, st.st_mtime_ns


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def scan_folder(root: Path) -> FolderScan:
    """Scan an image folder (see the module docstring): every file of every split, for
    packing it.

    Raises:
        UserError: missing path, no class sub-folders, one class, an empty class, classes in
            test/ or val/ that train/ lacks.
    """
    lay, ignored, splits = _layout(root), [0], {}
    for name in lay.splits:
        sp = splits[name] = FolderSplit([], [], [])
        for rel, label, size, mtime in _split_rows(lay, name, ignored):
            sp.files.append(rel)
            sp.labels.append(label)
            sp.stats.append((size, mtime))
    return FolderScan(lay.root, lay.class_names, splits, ignored[0])


def folder_digest(root: Path) -> str:
    """`scan_folder(root).sources_digest()`, streamed: the folder walked one class folder
    at a time, nothing kept per image (whether a pack is stale is asked by every run).

    Raises:
        UserError: as `scan_folder`.
    """
    lay = _layout(root)
    return _sources_sha256((name, ((f, size, mtime) for f, _, size, mtime
                                   in _split_rows(lay, name, [0])))
                           for name in sorted(lay.splits))


def _check_classes(root: Path, classes: list[str]) -> None:
    if not classes:
        raise UserError(f"{root} has no class sub-folders: put each class's images in "
                        "ROOT/CLASS_NAME/ (the ImageFolder layout)")
    if len(classes) < 2:
        raise UserError(f"{root} has a single class ({classes[0]}); a classifier needs two or more")


# --------------------------------------------------------------------------- decoding
def open_image(path: Path) -> Image.Image:
    """Open (lazily) one image file.

    Raises:
        UserError: not an image Pillow reads, or unreadable.
    """
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path} is not an image Pillow can read ({type(e).__name__})") from None


def probe_policy(root: Path, files: list[str], size: tuple[int, int] | None,
                 channels: int | None) -> ResizePolicy:
    """The policy for these files: channels from their modes when not given; without `size`,
    check that every image has one size (headers only, nothing decoded)."""
    sizes, colour = {}, False
    for f in files:
        try:
            with Image.open(root / f) as im:
                colour = colour or im.mode not in GRAY_MODES
                sizes.setdefault(im.size, f)
        except (UnidentifiedImageError, OSError, ValueError):
            continue  # decoding names (or skips) it
    if size is None and len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise UserError(f"images of different sizes ({f1} is {s1[0]}x{s1[1]}, {f2} is "
                        f"{s2[0]}x{s2[1]}): give --image-size HxW")
    if size is None and sizes:
        w, h = next(iter(sizes))
        size = (h, w)
    return ResizePolicy(size, channels or (3 if colour else 1))


def decode(path: Path, policy: ResizePolicy) -> np.ndarray:
    """One image as uint8 (C, H, W) under `policy`.

    Raises:
        UserError: not an image, corrupt or truncated (the message names the file).
    """
    mode = "L" if policy.channels == 1 else "RGB"
    h, w = policy.size
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":  # decode at a reduced scale that still covers the target
                im.draft(mode, _cover(im.size, (w, h)))
            im = im.convert(mode)
            if im.size != (w, h):
                im = _resize_crop(im, (w, h))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"corrupt or truncated image {path} ({type(e).__name__}: {e}); "
                        "use --skip-bad-images to skip such files") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _cover(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of `size` scaled so that both sides cover `target` (w, h)."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


def _resize_crop(im: Image.Image, target: tuple[int, int]) -> Image.Image:
    w, h = _cover(im.size, target)
    im = im.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - target[0]) // 2, (h - target[1]) // 2
    return im.crop((left, top, left + target[0], top + target[1]))
