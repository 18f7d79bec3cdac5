"""Activation cache: bit-exact round trip, deterministic order, checksums, keys, budget."""
import threading

import pytest
import torch

from edgetrain.data.batches import batch_indices, epoch_generator
from edgetrain.errors import UserError
from edgetrain.storage import cache as cache_mod
from edgetrain.storage.cache import (CacheInvalid, CacheReader, CacheSource, CacheWriter, prefetch,
                                     sequential_rows)


def _write(tmp_path, x, dtype="float32", views=1, key="k1", shard_bytes=4096):
    n = len(x) // views
    w = CacheWriter(tmp_path / "c", key, tuple(x.shape[1:]), dtype, n, views, shard_bytes)
    for i in range(0, len(x), 7):  # batches that do not line up with shards
        w.add(x[i:i + 7])
    return w.close()


def test_float32_round_trip_is_bit_exact(tmp_path):
    x = torch.randn(50, 3, 4, 4)
    m = _write(tmp_path, x)
    assert len(m["shards"]) == 3 and m["count"] == 50  # 21 + 21 + 8 rows of 192 bytes
    r = CacheReader(tmp_path / "c", "k1")
    assert torch.equal(r.rows(torch.arange(50)), x)
    idx = torch.randperm(50)
    assert torch.equal(r.rows(idx), x[idx])
    assert torch.equal(torch.cat(list(sequential_rows(r, 8, 1 << 20))), x)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_storage_returns_the_rounded_values(tmp_path, dtype):
    x = torch.randn(20, 5)
    _write(tmp_path, x, dtype=dtype)
    got = CacheReader(tmp_path / "c", "k1").rows(torch.arange(20))
    assert got.dtype == torch.float32
    assert torch.equal(got, x.to(getattr(torch, dtype)).float())


def test_float16_overflow_is_refused_not_stored_as_infinity(tmp_path):
    """Finite activations beyond float16's range would be stored as inf and turn the next
    module's loss into NaN; the writer refuses them with one line naming the way out."""
    from edgetrain.storage.cache import CacheOverflow
    x = torch.randn(20, 5)
    x[13, 2] = 1e6
    with pytest.raises(CacheOverflow, match="1e\\+06.*--cache-dtype bfloat16"):
        _write(tmp_path, x, dtype="float16")
    _write(tmp_path, x, dtype="bfloat16")  # bfloat16 holds the range
    x[13, 2] = float("inf")  # already infinite: stored as it is (the loss check reports it)
    _write(tmp_path, x, dtype="float16")


def test_batches_follow_the_raw_order_for_a_seed_and_views_rotate(tmp_path):
    n, views = 30, 2
    x = torch.arange(n * views, dtype=torch.float32).view(-1, 1)  # row value = row number
    _write(tmp_path, x, views=views)
    labels = torch.arange(n)
    src = CacheSource(CacheReader(tmp_path / "c", "k1"), labels, 8, torch.device("cpu"), seed=3)
    for epoch in (0, 1):
        got = list(src.epoch(epoch, salt=2))
        want = list(batch_indices(n, 8, True, epoch_generator(3, 2, epoch)))
        assert [y.tolist() for _, y in got] == [w.tolist() for w in want]
        assert [xb.flatten().long().tolist() for xb, _ in got] == [
            (w + epoch * n).tolist() for w in want]  # epoch e reads view e % views
    again = [y.tolist() for _, y in src.epoch(0, salt=2)]
    assert again == [y.tolist() for _, y in src.epoch(0, salt=2)]
    other = CacheSource(src.reader, labels, 8, torch.device("cpu"), seed=4)
    assert [y.tolist() for _, y in other.epoch(0, salt=2)] != again


def test_truncated_shard_is_detected(tmp_path):
    _write(tmp_path, torch.randn(50, 3, 4, 4))
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheInvalid, match="shard-00001.*truncated"):
        CacheReader(tmp_path / "c", "k1")


def test_altered_shard_is_detected_even_after_opening(tmp_path):
    _write(tmp_path, torch.randn(50, 3, 4, 4))
    r = CacheReader(tmp_path / "c", "k1")
    shard = tmp_path / "c" / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the tensor data, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheInvalid, match="checksum"):
        CacheReader(tmp_path / "c", "k1")
    src = CacheSource(r, torch.zeros(50, dtype=torch.long), 8, torch.device("cpu"))
    with pytest.raises(CacheInvalid, match="checksum"):
        next(iter(src.epoch(0)))  # verified again before every epoch


def test_incomplete_or_stale_cache_is_never_read(tmp_path):
    _write(tmp_path, torch.randn(10, 2), key="old")
    with pytest.raises(CacheInvalid, match="key mismatch"):
        CacheReader(tmp_path / "c", "new")
    (tmp_path / "c" / "manifest.json").unlink()  # as if killed before the manifest
    with pytest.raises(CacheInvalid, match="no complete"):
        CacheReader(tmp_path / "c", "old")


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    class Usage:
        free = 10 * 2**20
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: Usage)
    cache_mod.check_free_space(tmp_path, 1 * 2**20, "small")
    with pytest.raises(UserError, match="needs .* MiB .* only 10.0 MiB are free"):
        cache_mod.check_free_space(tmp_path, 50 * 2**20, "the activation cache of module 2")


def test_prefetch_stays_within_its_bound_and_passes_errors():
    produced, consumed, ahead = [0], [0], []
    lock = threading.Lock()

    def items():
        for i in range(20):
            with lock:
                produced[0] += 1
                ahead.append(produced[0] - consumed[0])
            yield i
        raise RuntimeError("reader failed")

    out = []
    with pytest.raises(RuntimeError, match="reader failed"):
        for it in prefetch(items(), 3, background=True):
            with lock:
                consumed[0] += 1
            out.append(it)
    assert out == list(range(20))
    assert max(ahead) <= 3 + 2  # queue bound + the one being put + the one being consumed


def test_a_sequential_run_whose_activations_overflow_float16_stops_with_one_line(
        tmp_path, monkeypatch):
    """Module 1's outputs beyond float16's range: the run stops at the cache write, exit 2,
    one line naming the module and --cache-dtype (before: NaN at module 2's first step)."""
    from click.testing import CliRunner
    from edgetrain.cli import cli
    from edgetrain.method.stage import Stage
    features = Stage.features
    monkeypatch.setattr(Stage, "features", lambda self, x: features(self, x) * 1e6)
    r = CliRunner().invoke(cli, ["train", "--data", "digits", "--train-size", "200", "--model",
                                 "kmresnet", "--width", "4", "--depth", "2", "--modules", "2",
                                 "--epochs", "1", "--mode", "sequential", "--no-progress",
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    (line,) = [l for l in r.output.splitlines() if l.strip()]
    assert "module 1's outputs (the train activation cache of module 2)" in line and "--cache-dtype bfloat16" in line
    assert (tmp_path / "run" / "modules" / "00.safetensors").is_file()  # module 1 kept


def test_prefetch_reads_in_the_callers_thread_when_no_core_is_free(monkeypatch):
    """With every usable core in torch's intra-op team, batches are read as they are asked
    for, in the consumer's thread; with a core free, by the background thread."""
    seen = []

    def items():
        for i in range(3):
            seen.append(threading.current_thread().name)
            yield i

    monkeypatch.setattr(cache_mod, "usable_cores", lambda: torch.get_num_threads())
    assert not cache_mod.background_reads()
    assert list(prefetch(items(), 2)) == [0, 1, 2]
    assert set(seen) == {threading.current_thread().name}
    seen.clear()
    monkeypatch.setattr(cache_mod, "usable_cores", lambda: torch.get_num_threads() + 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cache_mod.background_reads()
    assert list(prefetch(items(), 2)) == [0, 1, 2]
    assert set(seen) == {"edgetrain-prefetch"}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes' teams on the node
    assert not cache_mod.background_reads()
