"""Image folders and the data pack: packing is exact and atomic, every regime trains from a
folder through the streaming reader, predict and eval agree, bad folders fail in one line."""
from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner
import numpy as np
from PIL import Image
import pytest
import torch

from edgetrain.cli import cli
from edgetrain.data.builtin import FASHION_DIR, _read_idx, fashion_available
from edgetrain.data.folder import folder_digest, scan_folder
from edgetrain.data.pack import PACK_JSON, open_folder_pack, read_pack
from edgetrain.data.splits import load_splits
from edgetrain.errors import Stopped, UserError
from edgetrain.export.predict import predict
from edgetrain.method.loop import RawSource
from edgetrain.regimes.schedule import evaluate_run, resume, train
from tests.conftest import tiny_cfg


def digits_arrays(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return x[:n], d.target[:n]


def write_folder(root: Path, x: np.ndarray, y: np.ndarray, ext: str = "png",
                 test_every: int | None = 5, mode: str = "L", size: int | None = None) -> Path:
    """ImageFolder of images x (N, H, W) uint8 and labels y; train/ and test/ splits when
    `test_every`, else one level of class folders. File names sort in index order."""
    for i, (im, label) in enumerate(zip(x, y)):
        split = ("test" if i % test_every == 0 else "train") if test_every else ""
        d = root / split / f"class{int(label)}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(im)
        if size:
            img = img.resize((size, size), Image.Resampling.NEAREST)
        img.convert(mode).save(d / f"{i:05d}.{ext}", quality=95)
    return root


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    x, y = digits_arrays(400)
    return write_folder(tmp_path_factory.mktemp("digits") / "digits", x, y, size=16)


def test_png_folder_packs_back_exactly(tmp_path):
    """PNG is lossless: the pack holds exactly the arrays and labels, rows in sorted path order."""
    if fashion_available():
        x = _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")[:240]
        y = _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")[:240].astype(np.int64)
    else:
        x, y = digits_arrays(240)
    root = write_folder(tmp_path / "fm", x, y, test_every=None)
    pack = open_folder_pack(root, tmp_path / "cache")
    sp = pack.splits["train"]
    order = sorted(range(len(y)), key=lambda i: f"class{y[i]}/{i:05d}.png")
    got = sp.reader.raw_rows(torch.arange(sp.reader.count))
    assert got.dtype == torch.uint8 and got.shape == (len(y), 1, *x.shape[1:])
    assert torch.equal(got[:, 0], torch.from_numpy(x[order]))
    assert sp.labels.tolist() == [int(y[i]) for i in order]
    assert pack.info["policy"]["channels"] == 1  # every image grayscale
    mean = x.astype(np.float64).mean() / 255
    assert abs(pack.info["mean"][0] - float(mean)) < 1e-5


def test_jpeg_colour_folder_resize_policy_and_channels(tmp_path):
    x, y = digits_arrays(60)
    root = write_folder(tmp_path / "jpg", x, y, ext="jpg", mode="RGB", size=40)
    pack = open_folder_pack(root, tmp_path / "cache", size=(12, 20))
    assert pack.info["shape"] == [3, 12, 20]  # colour mode -> 3 channels; HxW as asked
    pack1 = open_folder_pack(root, tmp_path / "cache", size=(12, 20), channels=1)
    assert pack1.info["shape"] == [1, 12, 20] and pack1.directory != pack.directory


def test_pack_is_reused_repacked_when_changed_and_never_read_corrupt(tmp_path, digits_folder):
    cache = tmp_path / "cache"
    p1 = open_folder_pack(digits_folder, cache)
    stamp = (p1.directory / PACK_JSON).stat().st_mtime_ns
    assert (open_folder_pack(digits_folder, cache).directory / PACK_JSON).stat().st_mtime_ns == stamp
    # a corrupt shard is never read: the pack is rebuilt
    shard = next((p1.directory / "train").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    p2 = open_folder_pack(digits_folder, cache)
    assert (p2.directory / PACK_JSON).stat().st_mtime_ns != stamp
    # a changed folder (one more image) is repacked
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(digits_folder / "train" / "class0" / "zz.png")
    try:
        p3 = open_folder_pack(digits_folder, cache)
        assert p3.info["counts"]["train"] == p2.info["counts"]["train"] + 1
    finally:
        (digits_folder / "train" / "class0" / "zz.png").unlink()
    # an incomplete pack (no pack.json) is refused by the reader
    (p3.directory / PACK_JSON).unlink()
    with pytest.raises(UserError):
        read_pack(p3.directory)


def test_a_pack_keeps_a_digest_of_its_sources_and_the_list_beside_it(tmp_path, digits_folder):
    """A run holds pack.json for its whole life: the file list stays out of it (sources.json)."""
    pack = open_folder_pack(digits_folder, tmp_path / "cache")
    assert "sources" not in pack.info and len(pack.info["sources_sha256"]) == 64
    listed = json.loads((pack.directory / pack.info["sources_file"]).read_text())
    n = sum(len(v) for v in listed.values())
    assert n == sum(pack.info["counts"].values()) and all(len(e) == 3 for v in listed.values()
                                                          for e in v)
    touched = next((digits_folder / "train").rglob("*.png"))
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, newer
    try:
        again = open_folder_pack(digits_folder, tmp_path / "cache")
        assert again.info["sources_sha256"] != pack.info["sources_sha256"]
    finally:
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.slow
def test_two_writers_of_one_pack(tmp_path, digits_folder):
    """Two processes packing the same folder at once: both end with one valid pack."""
    import subprocess  # two fresh writer processes
    import sys  # the interpreter running the tests
    code = ("import sys; from edgetrain.data.pack import open_folder_pack; "
            "print(open_folder_pack(sys.argv[1], sys.argv[2]).info['counts']['train'])")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(digits_folder), str(tmp_path / "c")],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["320", "320"]
    packs = list((tmp_path / "c").iterdir())
    assert len(packs) == 1 and read_pack(packs[0]).info["counts"]["train"] == 320


def test_streamed_batches_equal_the_in_memory_ones(tmp_path, digits_folder):
    """The pread reader with prefetch yields bit for bit the batches of an in-RAM split."""
    data = load_splits(str(digits_folder), data_cache=str(tmp_path / "c"), seed=3)
    whole = data.train.rows(torch.arange(len(data.train)))  # the baseline holds the split
    src = RawSource(data, data.train, 32, torch.device("cpu"), train=True, seed=3,
                    prefetch_bytes=4096)
    gen_batches = list(src.epoch(2, salt=1))
    from edgetrain.data.batches import augment, batch_indices, epoch_generator  # the reference
    gen = epoch_generator(3, 1, 2)
    ref = [(augment(data.normalize(whole[i]), gen, data.flip), data.train.y[i])
           for i in list(batch_indices(len(data.train), 32, True, gen))]
    assert len(gen_batches) == len(ref)
    for (a, ya), (b, yb) in zip(gen_batches, ref):
        assert torch.equal(a, b) and torch.equal(ya, yb)


@pytest.mark.parametrize("mode", ["e2e", "parallel", "sequential", "multilap"])
def test_every_regime_trains_from_a_folder(mode, tmp_path, digits_folder):
    # parallel: 2 epochs (10 steps), 1 left the strided heads at chance on 320 images
    cfg = tiny_cfg(data=str(digits_folder), train_size=None, mode=mode, laps=2,
                   epochs=2 if mode in ("multilap", "parallel") else 1,
                   data_cache=str(tmp_path / "c"))
    m = train(cfg, tmp_path / "run")
    assert m["data"]["counts"] == {"train": 320, "test": 80}
    assert m["best_test_acc"] > 0.1  # above chance (10 classes)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"] == str(digits_folder.resolve())
    prep = json.loads((tmp_path / "run" / "preprocessing.json").read_text())
    assert prep["class_names"] == [f"class{i}" for i in range(10)]


def test_predict_top1_equals_eval_test_accuracy(tmp_path, digits_folder):
    cfg = tiny_cfg(data=str(digits_folder), train_size=None, mode="sequential", epochs=2,
                   data_cache=str(tmp_path / "c"))
    run = tmp_path / "run"
    train(cfg, run)
    res = evaluate_run(run)
    k = res["best_depth"]
    _, preds = predict(run, [digits_folder / "test"], depth="best", top_k=1)
    hits = [Path(p.file).parent.name == p.top[0][0] for p in preds]
    assert len(preds) == 80
    assert sum(hits) / len(hits) == pytest.approx(res["modules"][k - 1]["test_acc"])
    pc = json.loads((run / "metrics.json").read_text())["test_per_class"]
    diag = sum(pc["confusion"][i][i] for i in range(10))
    assert diag / sum(pc["support"]) == pytest.approx(res["modules"][k - 1]["test_acc"])
    # predict needs only the run directory: the pack gone, the images given by path
    import shutil  # only this test removes the pack
    shutil.rmtree(tmp_path / "c")
    out = CliRunner().invoke(cli, ["predict", str(run), str(digits_folder / "test" / "class3"),
                                   "--json", "--top-k", "2"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["depth"] == k and len(doc["predictions"][0]["top"]) == 2


# --------------------------------------------------------------------------- bad input
def _bad(kind: str, root: Path) -> Path:
    x, y = digits_arrays(40)
    if kind == "missing":
        return root / "nope"
    if kind == "no-classes":
        root.mkdir()
        Image.fromarray(x[0]).save(root / "a.png")
        return root
    if kind == "one-class":
        return write_folder(root, x, np.zeros_like(y), test_every=None)
    if kind == "empty-class":
        write_folder(root, x, y % 2, test_every=None)
        (root / "class9").mkdir()
        return root
    if kind == "corrupt":
        write_folder(root, x, y % 2, test_every=None)
        (root / "class1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        return root
    if kind == "test-class-missing-in-train":
        write_folder(root, x, y % 2)
        (root / "test" / "class7").mkdir()
        Image.fromarray(x[0]).save(root / "test" / "class7" / "a.png")
        return root
    if kind == "mixed-sizes":
        write_folder(root, x, y % 2, test_every=None)
        Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "class0" / "big.png")
        return root
    raise ValueError(kind)


@pytest.mark.parametrize("kind,words", [
    ("missing", "no image folder"), ("no-classes", "no class sub-folders"),
    ("one-class", "single class"), ("empty-class", "holds no image"),
    ("corrupt", "bad.png"), ("test-class-missing-in-train", "train lacks"),
    ("mixed-sizes", "--image-size"),
])
def test_bad_folder_is_one_line_exit_2_nothing_written(kind, words, tmp_path):
    data = _bad(kind, tmp_path / "data")
    out = tmp_path / "run"
    arg = str(data) if kind != "missing" else "./" + os.path.relpath(data)
    r = CliRunner().invoke(cli, ["train", "--data", arg, "--data-cache", str(tmp_path / "c"),
                                 "--out", str(out), "--mode", "e2e", "--epochs", "1",
                                 "--no-progress"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.output
    assert not out.exists()
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_skip_bad_images_counts_them_in_metrics(tmp_path):
    data = _bad("corrupt", tmp_path / "data")
    (data / "class0" / "README.txt").write_text("not an image")
    cfg = tiny_cfg(data=str(data), train_size=None, mode="e2e", epochs=1, skip_bad_images=True,
                   data_cache=str(tmp_path / "c"))
    m = train(cfg, tmp_path / "run")
    assert m["data"]["skipped_bad_images"] == 1 and m["data"]["skipped_files"] == ["class1/bad.png"]
    assert m["data"]["ignored_files"] == 1


def test_folder_changed_while_packing_is_refused(tmp_path, monkeypatch, digits_folder):
    import edgetrain.data.pack as pack_mod  # the decode hook that changes the folder
    real = pack_mod.decode
    calls = []

    def decode_and_touch(path, policy):
        calls.append(path)
        if len(calls) == 5:
            (digits_folder / "train" / "class1" / "new.png").write_bytes(
                (digits_folder / "test" / "class0" / "00000.png").read_bytes())
        return real(path, policy)

    monkeypatch.setattr(pack_mod, "decode", decode_and_touch)
    try:
        with pytest.raises(UserError, match="changed while it was being packed"):
            open_folder_pack(digits_folder, tmp_path / "c")
    finally:
        (digits_folder / "train" / "class1" / "new.png").unlink()
    assert not any((tmp_path / "c").iterdir())  # nothing half-written is left


def test_disk_full_while_packing_leaves_nothing(tmp_path, monkeypatch, digits_folder):
    import errno  # the injected failure

    from edgetrain.storage import atomic

    def full(path, write, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "atomic_write", full)
    with pytest.raises(UserError, match="no space left"):
        open_folder_pack(digits_folder, tmp_path / "c")
    assert not any((tmp_path / "c").iterdir())


def test_predict_on_a_file_that_is_not_an_image(tmp_path, digits_folder):
    cfg = tiny_cfg(data=str(digits_folder), train_size=None, mode="e2e", epochs=1,
                   data_cache=str(tmp_path / "c"))
    train(cfg, tmp_path / "run")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "run"), str(txt)])
    assert r.exit_code == 2 and "not an image" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "run"), str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and "no such file" in r.output


def _gone_folder_run(tmp_path: Path, mode: str = "e2e") -> tuple[Path, Path, dict]:
    """A tiny run trained on a 3-class folder: (folder, run directory, metrics)."""
    x, y = digits_arrays(100)
    data = write_folder(tmp_path / "gone", x, y % 3)
    cfg = tiny_cfg(data=str(data), train_size=None, mode=mode, epochs=1,
                   data_cache=str(tmp_path / "c"))
    return data, tmp_path / "run", train(cfg, tmp_path / "run")


def test_eval_reads_the_pack_when_the_folder_is_gone_and_says_when_both_are(tmp_path):
    import shutil  # only these tests remove folders
    data, run, metrics = _gone_folder_run(tmp_path)
    shutil.rmtree(data)
    r = CliRunner().invoke(cli, ["eval", str(run)])
    assert r.exit_code == 0, r.output
    again = evaluate_run(run)  # the same figures as training's, from the pack alone
    assert [e["test_acc"] for e in again["modules"]] == pytest.approx(
        [m["test_acc"] for m in metrics["modules"]], abs=1e-9)
    assert sum(again["test_per_class"]["support"]) == metrics["data"]["counts"]["test"]
    pack_dir = next(p for p in (tmp_path / "c").iterdir() if not p.name.startswith("."))
    shutil.rmtree(tmp_path / "c")
    r = CliRunner().invoke(cli, ["eval", str(run)])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert str(data) in lines[0] and "is gone" in lines[0]  # what is missing
    assert f"looked for {pack_dir}" in lines[0]  # and where it looked


def _one_line_exit_2(args: list[str]) -> str:
    r = CliRunner().invoke(cli, args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    return lines[0]


def test_resume_reads_the_pack_when_the_folder_is_gone(tmp_path):
    """`train --resume` of a run stopped mid-way, its folder deleted: it ends as the run that
    was never stopped; with the pack moved away too, one line names both, exit 2."""
    import shutil  # only these tests remove folders
    x, y = digits_arrays(100)
    folder = write_folder(tmp_path / "gone", x, y % 3)
    cfg = dict(data=str(folder), train_size=None, mode="sequential", epochs=2,
               data_cache=str(tmp_path / "c"))
    whole = train(tiny_cfg(**cfg), tmp_path / "whole")
    steps = iter(range(1000))
    with pytest.raises(Stopped):
        train(tiny_cfg(**cfg), tmp_path / "run", stop=lambda: next(steps) == 2)  # mid-epoch
    shutil.rmtree(folder)
    pack_dir = next(p for p in (tmp_path / "c").iterdir() if not p.name.startswith("."))
    pack_dir.rename(tmp_path / "moved")
    line = _one_line_exit_2(["train", "--resume", str(tmp_path / "run"), "--no-progress"])
    assert str(folder) in line and "is gone" in line and f"looked for {pack_dir}" in line
    (tmp_path / "moved").rename(pack_dir)
    m = resume(tmp_path / "run")
    assert [e["test_acc"] for e in m["modules"]] == [e["test_acc"] for e in whole["modules"]]
    assert [e["train_loss"] for e in m["modules"]] == [e["train_loss"] for e in whole["modules"]]


def test_init_from_a_run_whose_folder_is_gone(tmp_path):
    """`--init RUN_DIR` of a run whose folder is gone reads that run's pack; folder and pack
    both gone: one line naming them and the --init source, exit 2."""
    import shutil  # only these tests remove folders
    folder, source, _ = _gone_folder_run(tmp_path)  # 1x8x8 images, as digits
    shutil.rmtree(folder)
    m = train(tiny_cfg(mode="e2e", epochs=1, train_size=100, init=str(source)), tmp_path / "ft")
    assert m["init"]["kind"] == "run" and m["init"]["heads"] == "new"  # 3 classes, not 10
    pack_dir = next(p for p in (tmp_path / "c").iterdir() if not p.name.startswith("."))
    shutil.rmtree(pack_dir)
    line = _one_line_exit_2(["train", "--data", "digits", "--init", str(source), "--mode", "e2e",
                             "--width", "8", "--depth", "4", "--epochs", "1",
                             "--out", str(tmp_path / "ft2"), "--no-progress"])
    assert f"--init {source}" in line and str(folder) in line and "is gone" in line
    assert f"looked for {pack_dir}" in line and not (tmp_path / "ft2").exists()


def test_a_relative_data_cache_is_stored_absolute(tmp_path, monkeypatch):
    """config.json names the data cache by its absolute path: eval from another working
    directory finds the pack of a folder that is gone."""
    import shutil  # only these tests remove folders
    x, y = digits_arrays(100)
    folder = write_folder(tmp_path / "gone", x, y % 3)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    r = CliRunner().invoke(cli, ["train", "--data", str(folder), "--data-cache", "rel-cache",
                                 "--mode", "e2e", "--epochs", "1", "--model", "kmresnet",
                                 "--width", "4", "--depth", "2", "--out", "run", "--no-progress"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "here" / "run"
    assert json.loads((run / "config.json").read_text())["data_cache"] == \
        str(tmp_path / "here" / "rel-cache")
    shutil.rmtree(folder)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["eval", str(run)])
    assert r.exit_code == 0, r.output


def _reference_digest(root: Path) -> str:
    """The staleness digest as first written: os.walk, every path sorted, then hashed."""
    import hashlib  # the reference only
    h = hashlib.sha256()
    layout = {s: root / s for s in ("test", "train", "val") if (root / s).is_dir()}
    for name, base in (layout if "train" in layout else {"all": root}).items():
        rows = []
        for cls in (d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for dirpath, _, names in os.walk(cls):
                for n in names:
                    p = Path(dirpath) / n
                    if n.lower().endswith((".png", ".jpg")) and not n.startswith("."):
                        st = p.stat()
                        rows.append((str(p.relative_to(base)), st.st_size, st.st_mtime_ns))
        h.update(f"[{name}]\n".encode())
        pre = "" if name == "all" else f"{name}/"
        for f, size, mtime in sorted(rows):
            h.update(f"{pre}{f}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


@pytest.mark.parametrize("split_layout", [False, True])
def test_the_streamed_digest_is_the_scans_and_packs_stay_valid(tmp_path, split_layout):
    """`folder_digest` walks one folder at a time and gives the digest of today's packs
    (sorted relative paths), also where walking class by class is not that order: class
    "a" sorts before "a-b" but "a-b/..." before "a/..."; nested folders; ignored files."""
    root = tmp_path / "f"
    x = digits_arrays(12)[0]
    for i, rel in enumerate(["a/z.png", "a/sub/b.png", "a/sub.png", "a-b/1.png", "a-b/x/2.jpg",
                             "a.b/3.png", "b/.hidden.png", "b/4.png", "b/notes.txt"]):
        for part in (["train/", "test/"] if split_layout else [""]):
            path = root / f"{part}{rel}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".txt"):
                path.write_text("not an image")
            else:
                Image.fromarray(x[i]).save(path)
    if not split_layout:  # a symlinked sub-folder is not entered (as os.walk)
        (root / "b" / "loop").symlink_to(root / "a")
    scan = scan_folder(root)
    files = [f for sp in scan.splits.values() for f in sp.files]
    assert all(sp.files == sorted(sp.files) for sp in scan.splits.values())
    assert len(files) == (14 if split_layout else 7) and scan.ignored == (4 if split_layout else 2)
    assert folder_digest(root) == scan.sources_digest() == _reference_digest(root)
    sp = scan.splits["test" if split_layout else "all"]
    assert [scan.class_names[i] for i in sp.labels] == \
        [f.split("/")[1 if split_layout else 0] for f in sp.files]


def test_a_packed_folder_is_not_scanned_again_and_holds_its_labels_in_int32(tmp_path,
                                                                            monkeypatch,
                                                                            digits_folder):
    """Opening a pack that exists walks the folder for its digest only (no file list), and
    keeps labels and row numbers in 4 bytes per image; batches carry int64 labels."""
    import edgetrain.data.pack as pack_mod  # the scan that must not run
    open_folder_pack(digits_folder, tmp_path / "c")

    def no_scan(root):
        raise AssertionError("scanned")

    monkeypatch.setattr(pack_mod, "scan_folder", no_scan)
    pack = open_folder_pack(digits_folder, tmp_path / "c")
    assert "labels" not in pack.splits["train"].reader.manifest  # the JSON list let go
    data = load_splits(str(digits_folder), data_cache=str(tmp_path / "c"), seed=3)
    for sp in (data.train, data.val, data.test):
        assert sp.index.dtype == sp.y.dtype == torch.int32
    _, yb = next(iter(RawSource(data, data.train, 16, torch.device("cpu")).epoch()))
    assert yb.dtype == torch.int64


@pytest.mark.slow  # ~15 s: train, then torch.export
def test_export_needs_only_the_run_directory(tmp_path):
    """Folder and pack deleted: export still checks the file with ONNX Runtime (on inputs
    built from preprocessing.json), and the file classifies an image as predict does."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import shutil  # only these tests remove folders
    data, run, _ = _gone_folder_run(tmp_path, mode="sequential")
    image = tmp_path / "one.png"
    shutil.copy(next((data / "test" / "class1").iterdir()), image)
    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "c")
    out = tmp_path / "p.onnx"
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "same class on 256/256" in r.output
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == ["class0", "class1", "class2"]
    mean = np.array(json.loads(meta["mean"]), np.float32).reshape(1, -1, 1, 1)
    std = np.array(json.loads(meta["std"]), np.float32).reshape(1, -1, 1, 1)
    px = np.asarray(Image.open(image).convert("L"), np.float32)[None, None]  # (1, 1, H, W)
    logits = sess.run(None, {"input": (px / 255.0 - mean) / std})[0]
    k, preds = predict(run, [image], depth=json.loads(meta["depth"]), top_k=1)
    assert ["class0", "class1", "class2"][int(logits.argmax())] == preds[0].top[0][0]


def test_one_writer_decodes_a_folder_while_another_waits(tmp_path, monkeypatch, digits_folder):
    """Two packers of one folder at once (two threads: flock excludes separate opens): the
    second waits on the pack's writer lock and reads the first one's pack, so every image
    is decoded once; no lock file or temporary directory is left."""
    import threading  # two concurrent packers
    import time  # the first decode lingers so that the second packer overlaps it
    import edgetrain.data.pack as pack_mod  # the decode hook that counts
    real, calls = pack_mod.decode, []

    def slow_decode(path, policy):
        calls.append(path)
        if len(calls) == 1:
            time.sleep(1.0)
        return real(path, policy)

    monkeypatch.setattr(pack_mod, "decode", slow_decode)
    got, errors = [], []

    def pack():
        try:
            got.append(open_folder_pack(digits_folder, tmp_path / "c").directory)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=pack) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 2 and got[0] == got[1]
    assert len(calls) == 400  # each image decoded once, not once per packer
    assert [p.name for p in (tmp_path / "c").iterdir()] == [got[0].name]


# --------------------------------------------------------------------------- the manual's page
OWN_IMAGES_PAGE = Path(__file__).resolve().parents[2] / "docs" / "own-images.md"


def page_commands() -> list[list[str]]:
    """The train / eval / predict / export block of docs/own-images.md, one argv per line."""
    import re  # page parsing only
    import shlex  # page parsing only
    text = OWN_IMAGES_PAGE.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    block = next(b for b in blocks if b.startswith("edgetrain train --data photos"))
    return [shlex.split(line)[1:] for line in block.strip().splitlines()]


@pytest.mark.slow
def test_own_images_page_commands_run(tmp_path, monkeypatch):
    """The page's train / eval / predict / export commands, as written, on a folder like its own."""
    pytest.importorskip("onnxruntime")
    x, y = digits_arrays(300)
    names = np.array(["cat", "dog", "owl"])
    write_folder(tmp_path / "photos", x, y % 3, mode="RGB", size=40)
    for d in (tmp_path / "photos").rglob("class*"):
        d.rename(d.parent / names[int(d.name[5:])])
    monkeypatch.chdir(tmp_path)
    cmds = page_commands()
    assert [c[0] for c in cmds] == ["train", "eval", "predict", "export"]
    for args in cmds:
        if args[0] == "train":
            args = [*args, "--data-cache", str(tmp_path / "c")]  # not the home cache
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, (args, r.output)
    assert (tmp_path / "runs" / "photos" / "prefix.onnx").is_file()
