"""The data-stream benchmark's memory-flat table (edgetrain/bench/data_stream.py): the folder
writer, the table and its ratios. The figures themselves come from benchmarks/, not tests."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgetrain.bench.data_stream import (MEMORY_ARMS, MemorySetup, memory_markdown, memory_ratio,
                                         run_memory_table, write_image_folder)
from edgetrain.data.folder import scan_folder


def _row(mode, reader, n, mib):
    return {"mode": mode, "reader": reader, "n_images": n, "train_peak_above_imports_mib": mib,
            "wall_s": 1.0, "loadavg_1min": [1.0, 1.0]}


def test_ratios_are_large_over_small_and_missing_sizes_are_said():
    rows = [_row("e2e", "pack", 10, 100.0), _row("e2e", "pack", 80, 103.0),
            _row("e2e", "ram", 10, 100.0), _row("e2e", "ram", 80, 250.0),
            _row("sequential", "pack", 10, 120.0)]
    assert memory_ratio(rows, "e2e", "pack", 10, 80) == pytest.approx(1.03)
    assert memory_ratio(rows, "e2e", "ram", 10, 80) == pytest.approx(2.5)
    assert memory_ratio(rows, "sequential", "pack", 10, 80) is None
    res = {"setup": {**MemorySetup(n=10, factor=8).__dict__, "image_size": [64, 64]},
           "source": "digits", "rows": rows}
    md = memory_markdown(res)
    assert "| e2e | in RAM (InMemoryReader) | 80 | 250.0 |" in md
    assert "e2e, streamed from the pack: 80 vs 10 images: ratio 1.030" in md
    assert "sequential, in RAM (InMemoryReader): 80 vs 10 images: ratio **not measured" in md
    assert md.count("\n- ") == len(MEMORY_ARMS)


def test_the_written_folder_is_a_class_balanced_image_folder(tmp_path):
    x = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4) * 5
    y = np.array([0, 1, 1])
    write_image_folder(tmp_path / "f", 7, (x, y, ["a", "b"], "toy"))
    scan = scan_folder(tmp_path / "f")
    assert scan.class_names == ["a", "b"] and len(scan.splits["all"].files) == 7
    assert scan.splits["all"].labels.count(0) == 4  # classes alternate: a, b, a, b, ...


@pytest.mark.slow
def test_memory_table_smoke(tmp_path):
    """Every arm runs in its child and lands in the JSON and the table (figures unchecked)."""
    setup = MemorySetup(n=40, factor=2, image_size=(8, 8), batch_size=8, threads=1)
    res = run_memory_table(setup, tmp_path / "work", tmp_path / "out", "test", echo=lambda s: None)
    assert len(res["rows"]) == 2 * len(MEMORY_ARMS)
    saved = json.loads((tmp_path / "out" / "data_stream_memory.json").read_text())
    assert [(r["mode"], r["reader"], r["n_images"]) for r in saved["rows"]] == [
        (m, r, n) for m, r in MEMORY_ARMS for n in (40, 80)]
    assert all(r["train_peak_above_imports_mib"] > 0 for r in saved["rows"])
    assert not list((tmp_path / "work").glob("run-*"))  # run directories removed
