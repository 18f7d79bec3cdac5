"""The regime table of `edgetrain bench speed` (#29): total_over_e2e per row, the median of
paired rounds; the per-phase profile; an unchanged cache is not re-hashed every epoch."""
from __future__ import annotations

import statistics

import pytest
import torch

from edgetrain.bench import speed
from edgetrain.storage import cache
from edgetrain.storage.cache import CacheReader, CacheSource
from tests.storage.test_cache import _write


def test_regime_rows_are_medians_of_paired_rounds(tmp_path, monkeypatch):
    """Fake runs with known times: each ratio is the median of the per-round ratios."""
    times = {"e2e": [10.0, 20.0, 10.0], "parallel": [11.0, 30.0, 10.5],
             "sequential": [12.0, 22.0, 13.0], "multilap": [15.0, 24.0, 11.0]}
    calls = []

    def fake(cfg, out):
        i = sum(1 for c in calls if c == cfg.mode)
        calls.append(cfg.mode)
        t = times[cfg.mode][i]
        return {"total_s": t, "cpu_s": t / 2, "step_s": t / 4,
                "cache_s": t / 8 if cfg.mode in ("sequential", "multilap") else 0.0}
    monkeypatch.setattr(speed, "_one_regime", fake)
    rows = speed.regime_wall_clock(tmp_path, 4, 2, 64, "float16", model="resnet8", rounds=3)
    assert calls == list(speed.MODES) * 3  # paired: every regime once per round, e2e first
    by = {r["mode"]: r for r in rows}
    assert by["e2e"]["total_over_e2e"] == 1.0
    for mode, t in times.items():
        want = statistics.median([a / b for a, b in zip(t, times["e2e"])])
        assert by[mode]["total_over_e2e"] == pytest.approx(want)
        assert by[mode]["cpu_over_e2e"] == pytest.approx(want)
        assert by[mode]["total_s"] == statistics.median(t)
        cache = [a / 8 / b for a, b in zip(t, times["e2e"])] if mode in ("sequential", "multilap") \
            else [0.0]
        assert by[mode]["cache_over_e2e"] == pytest.approx(statistics.median(cache))
    table = "\n".join(speed.regimes_table(rows))
    assert "total_over_e2e" in table and f"{by['parallel']['total_over_e2e']:.3f}" in table


@pytest.mark.slow  # ~1 min on a quiet 2-core machine: 8 small trainings
def test_a_real_round_and_the_profile_on_a_tiny_job(tmp_path):
    rows = speed.regime_wall_clock(tmp_path, 2, 2, 64, "float16", model="resnet8", rounds=1)
    assert [r["mode"] for r in rows] == list(speed.MODES)
    assert all(r["total_s"] > 0 and r["total_over_e2e"] > 0 for r in rows)
    by = {r["mode"]: r for r in rows}  # the cache pass: a real part of the run's time
    assert by["e2e"]["cache_over_e2e"] == 0 == by["parallel"]["cache_over_e2e"]
    for mode in ("sequential", "multilap"):
        assert 0 < by[mode]["cache_over_e2e"] < by[mode]["total_over_e2e"]
    prof = speed.phase_profile(tmp_path, model="resnet8", k=2, epochs=2, synthetic_size=64)
    by = {r["mode"]: r for r in prof}
    assert by["sequential"]["cpu_s"]["cache writes (frozen prefix, eval mode)"] > 0
    assert by["e2e"]["cpu_s"]["cache writes (frozen prefix, eval mode)"] == 0
    for r in prof:
        assert 0 < r["cpu_s"]["training steps: backward + optimizer"] < r["cpu_s"]["train() in all"]
    assert 0 < by["parallel"]["head_share"] < 5
    assert "| phase |" in "\n".join(speed.profile_table(prof))


def test_step_parts_pair_every_variant_against_e2e_in_each_repetition():
    """Real steps of a tiny network: one row per variant, e2e first at ratio 1, positive
    times, and the table names every variant."""
    rows = speed.step_parts(model="resnet8", k=2, reps=2)
    assert [r["variant"] for r in rows] == [v[0] for v in speed.STEP_VARIANTS]
    assert rows[0]["over_e2e"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
    table = "\n".join(speed.steps_table(rows))
    assert all(v[0] in table for v in speed.STEP_VARIANTS)


def test_an_unchanged_cache_is_hashed_once_and_an_altered_one_again(tmp_path, monkeypatch):
    _write(tmp_path, torch.randn(50, 3, 4, 4))
    hashed = []
    real = cache._file_sha256
    monkeypatch.setattr(cache, "_file_sha256", lambda p: hashed.append(p) or real(p))
    r = CacheReader(tmp_path / "c", "k1")
    n = len(hashed)
    assert n == len(r.manifest["shards"])
    src = CacheSource(r, torch.zeros(50, dtype=torch.long), 8, torch.device("cpu"))
    for epoch in range(3):
        list(src.epoch(epoch))
    assert len(hashed) == n  # no re-read of the whole cache before every epoch
    shard = tmp_path / "c" / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(cache.CacheInvalid, match="checksum"):
        next(iter(src.epoch(0)))


def test_readers_of_one_run_share_what_they_verified(tmp_path, monkeypatch):
    _write(tmp_path, torch.randn(50, 3, 4, 4))
    hashed = []
    real = cache._file_sha256
    monkeypatch.setattr(cache, "_file_sha256", lambda p: hashed.append(p) or real(p))
    shared: dict = {}
    n = len(CacheReader(tmp_path / "c", "k1", shared).manifest["shards"])
    for _ in range(3):
        CacheReader(tmp_path / "c", "k1", shared).close()
    assert len(hashed) == n  # hashed at the first open only
    CacheReader(tmp_path / "c", "k1").close()  # a reader of its own hashes again
    assert len(hashed) == 2 * n
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(cache.CacheInvalid, match="checksum"):
        CacheReader(tmp_path / "c", "k1", shared)


def test_head_rows_pair_each_head_with_e2e_and_the_first_head(tmp_path, monkeypatch):
    """Fake runs whose time depends on (mode, head): each ratio is the median of per-round
    ratios against e2e and against the first head in the same mode."""
    base = {"e2e": 10.0, "parallel": 11.0, "sequential": 13.0}
    factor = {"dgl-s2": 1.0, "dgl-k1": 0.9}
    seen = []

    def fake(cfg, out):
        seen.append((cfg.mode, cfg.head))
        r = sum(1 for s in seen if s == seen[-1])  # the round, from 1
        t = base[cfg.mode] * (factor[cfg.head] if cfg.mode != "e2e" else 1.0) * (1 + 0.1 * r)
        return {"total_s": t, "cpu_s": t, "step_s": t}
    monkeypatch.setattr(speed, "_one_regime", fake)
    rows = speed.head_wall_clock(tmp_path, rounds=3, model="resnet8", synthetic_size=64)
    assert seen[:5] == [("e2e", "auto"), ("parallel", "dgl-s2"), ("parallel", "dgl-k1"),
                        ("sequential", "dgl-s2"), ("sequential", "dgl-k1")]
    by = {(r["mode"], r["head"]): r for r in rows}
    assert by[("parallel", "dgl-k1")]["over_first_head"] == pytest.approx(0.9)
    assert by[("sequential", "dgl-k1")]["total_over_e2e"] == pytest.approx(1.3 * 0.9)
    assert by[("e2e", None)]["over_first_head"] is None
    assert "| parallel | dgl-k1 |" in "\n".join(speed.heads_table(rows))
