"""Every result file is indexed (what it holds, the command that made it, when) in the README
of its folder: benchmarks/results/README.md and research/<study>/README.md."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _index_module():
    spec = importlib.util.spec_from_file_location("index_results", ROOT / "benchmarks/index_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_result_file_is_in_its_folders_index():
    idx = _index_module()
    folders = idx.targets()
    assert len(folders) >= 2 and all(f.is_dir() for f, _, _ in folders)
    assert [m for f, readme, _ in folders for m in idx.missing(f, readme)] == []


def test_an_unindexed_file_is_reported(tmp_path):
    idx = _index_module()
    (tmp_path / "speed.json").write_text("{}")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    assert idx.missing(tmp_path, readme) == ["speed.json"]
    readme.write_text(idx.with_index("# x\n", idx.index_table(tmp_path)))
    assert idx.missing(tmp_path, readme) == []
    (tmp_path / "mystery.bin").write_text("")  # in no row of the table: no description
    assert idx.missing(tmp_path, readme) == ["mystery.bin"]
