"""Tensor accounting, per-phase peaks (edgetrain.measure) and the peak estimator (edgetrain.budget.estimate)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

from edgetrain import measure as memory
from edgetrain.budget.estimate import estimate_peak
from edgetrain.measure import PhaseRecorder, account_training_step, saved_activation_bytes
from edgetrain.units import MIB
from tests.conftest import tiny_cfg


def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def test_linear_accounting_equals_hand_count():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(2, 4)
    acc = account_training_step(m, _sgd(m), lambda mod, t: mod(t).pow(2).sum(), x)
    params = (4 * 3 + 3 + 3 * 2 + 2) * 4  # 23 floats
    # saved: relu output (2x3, also the second linear's input: one storage) and the
    # second linear's output (2x2) for pow; the input x and the weights are not activations
    assert acc == {"params_bytes": params, "grads_bytes": params, "optimizer_bytes": params,
                   "activations_bytes": (2 * 3 + 2 * 2) * 4, "input_batch_bytes": 2 * 4 * 4,
                   "total_bytes": 3 * params + 40 + 32}


def test_conv_accounting_equals_hand_count():
    torch.manual_seed(0)
    m = nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5)
    acc = account_training_step(m, _sgd(m), lambda mod, t: torch.relu(mod(t)).view(-1).pow(2).sum(), x)
    params = (2 * 1 * 3 * 3 + 2) * 4
    assert acc["params_bytes"] == acc["grads_bytes"] == acc["optimizer_bytes"] == params
    assert acc["activations_bytes"] == 1 * 2 * 3 * 3 * 4  # relu output once, its view not again
    assert acc["input_batch_bytes"] == 100


def test_adamw_state_counted():
    m = nn.Linear(10, 10)
    opt = torch.optim.AdamW(m.parameters())
    acc = account_training_step(m, opt, lambda mod, t: mod(t).sum(), torch.randn(3, 10))
    assert acc["optimizer_bytes"] >= 2 * acc["params_bytes"]


def test_views_and_parameters_not_double_counted():
    w = nn.Parameter(torch.randn(8, 8))
    x = torch.randn(8, 8, requires_grad=True)

    def fn():
        h = (x * 2).relu()  # h is saved by the matmuls below, through three views
        a = h.t() @ w.t()  # saves h.t() and w.t() (a view of a parameter)
        b = h.view(64).unsqueeze(0).sin()  # sin saves its input: a view of h
        return (a.sum() + h[:4].exp().sum() + b.sum())

    n, _ = saved_activation_bytes(fn)
    h_bytes = 8 * 8 * 4
    exp_out = 4 * 8 * 4  # exp saves its result
    assert n == h_bytes + exp_out


def test_phase_recorder_separates_nested_phases():
    rec = PhaseRecorder()
    with rec.phase("train"):
        with rec.phase("cache_write"):
            big = torch.ones(64 * MIB // 4)  # 64 MiB touched inside the nested phase
            big += 1
            del big
    m = rec.metrics()
    assert m["cache_write"]["peak_rss_mib"] >= m["train"]["peak_rss_mib"] + 32
    assert rec.peak_rss_mib() >= m["cache_write"]["peak_rss_mib"]
    json.dumps(m)


def test_phase_recorder_times_each_phase_with_nested_ones_inside(monkeypatch):
    """seconds: wall time in the phase (perf_counter), summed over entries; a parent's
    includes its nested phases'."""
    clock = iter([0.0, 1.0, 3.0, 10.0, 10.5, 11.0])  # train [0, 10], cache [1, 3] + [10.5, 11]
    monkeypatch.setattr("edgetrain.measure.time.perf_counter", lambda: next(clock))
    rec = PhaseRecorder()
    with rec.phase("train"):
        with rec.phase("cache_write"):
            pass
    with rec.phase("cache_write"):
        pass
    m = rec.metrics()
    assert m["train"]["seconds"] == 10.0 and m["cache_write"]["seconds"] == 2.5
    assert m["cache_write"]["count"] == 2


def _pred(mode, **kw):
    cfg = tiny_cfg(data="synthetic", input_shape=(3, 32, 32), model="resnet20", width=8, depth=None,
                   mode=mode, modules=3, batch_size=32, **kw)
    return estimate_peak(cfg, (3, 32, 32), 10, n_train=256)


def test_parallel_accounted_peak_below_e2e_on_tiny_resnet():
    e2e, par, seq = _pred("e2e"), _pred("parallel"), _pred("sequential")
    assert par.train_step_bytes < e2e.train_step_bytes
    assert seq.params_bytes < par.params_bytes  # one module resident
    assert e2e.cache_disk_bytes == par.cache_disk_bytes == 0 < seq.cache_disk_bytes
    assert seq.peak_bytes == max(seq.train_step_bytes, seq.cache_write_bytes, seq.eval_bytes)


def test_prediction_covers_real_accounting_of_e2e():
    """The simulated step's activations (its peak beyond parameters, gradients, optimizer
    state and input) hold what a real CPU forward saves for backward, plus the backward's
    first gradients: at least the saved bytes, at most 15% more on this tiny net."""
    from edgetrain.method.stage import Stage
    from edgetrain.regimes.run import build_run
    cfg = tiny_cfg(mode="e2e", augment=False)
    run = build_run(cfg)
    whole = Stage(list(run.net.blocks), run.stages[-1].head, stem=run.net.stem).train()
    x = run.data.normalize(run.data.train.x[:cfg.batch_size])
    y = run.data.train.labels(torch.arange(cfg.batch_size))  # int64, as a loss takes
    held = []

    def loss():
        z, _ = whole.forward_statistic(x)  # e2e: the transport is a detached statistic
        logits = whole.head(z)
        held.extend([logits, z])  # alive until backward in train_step
        return torch.nn.functional.cross_entropy(logits, y)

    seen, _ = memory._saved_storages(loss, exclude=[x])
    for t in held:
        seen.setdefault(memory._storage_key(t), t.untyped_storage().nbytes())
    pred = estimate_peak(cfg, run.data.input_shape, run.data.num_classes)
    saved = sum(seen.values())
    assert 0.99 * saved <= pred.activations_bytes <= 1.15 * saved
    assert pred.params_bytes == memory.param_bytes(whole)


def test_runtime_baseline_is_cached_and_plausible():
    a = memory.runtime_baseline_bytes()
    assert memory.runtime_baseline_bytes() == a
    rt = memory.runtime_rss_bytes()
    assert 50 * MIB < rt["import_rss_bytes"] <= rt["warm_rss_bytes"] == a


def test_train_records_phase_peaks(tmp_path):
    from edgetrain.regimes.schedule import train
    m = train(tiny_cfg(mode="parallel", epochs=1), tmp_path / "run")
    assert {"train", "eval"} <= set(m["memory"])
    assert m["peak_rss_mib"] >= max(p["peak_rss_mib"] for p in m["memory"].values()) > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["memory"] == m["memory"]


def test_onednn_failure_is_out_of_memory_only_near_the_memory_s_end(monkeypatch):
    """oneDNN says `could not create a primitive` for a failed scratchpad allocation and for
    a kernel it cannot build alike: only with little left to allocate is it memory."""
    from edgetrain import measure
    e = RuntimeError("could not create a primitive")
    monkeypatch.setattr(measure, "memory_headroom_bytes", lambda: 100 * MIB)
    assert measure.is_out_of_memory(e)
    monkeypatch.setattr(measure, "memory_headroom_bytes", lambda: 8 * 1024 * MIB)
    assert not measure.is_out_of_memory(e)
    assert measure.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert measure.is_out_of_memory(MemoryError()) and not measure.is_out_of_memory(ValueError())


def test_memory_headroom_follows_the_address_space_limit():
    """In a child capped 300 MiB above its address space, the headroom is at most 300 MiB."""
    code = ("import resource; from edgetrain import measure as m; "
            "vm = m._status_kib('VmSize') * 1024; "
            "resource.setrlimit(resource.RLIMIT_AS, (vm + 300 * 2**20, resource.RLIM_INFINITY)); "
            "print(m.memory_headroom_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert 0 < int(out) <= 300 * MIB
    assert memory.memory_headroom_bytes() > 0
