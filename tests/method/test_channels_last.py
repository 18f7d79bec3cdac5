"""Channels-last CPU modules (#29): adopted where they are faster and safe (AVX-512 kernels),
kept off oneDNN's AVX2 kernels, where torch 2.14.1 corrupts the heap in the weight gradient
of a small channels-last 1x1 stride-2 convolution (benchmarks/channels_last_repro_torch.py).

The guard runs the configurations of the accuracy benchmark's smoke grid, whose run aborted
when channels-last was first adopted, through the product path (`edgetrain.train`) in fresh
processes: once on this machine's own kernels and once as a CPU without AVX-512
(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from edgetrain.errors import UserError

from edgetrain.config import RunConfig
from edgetrain.method.precision import memory_format
from edgetrain.regimes.run import build_run
from edgetrain.storage.modules import load_module, save_module

# the smoke grid's configurations (edgetrain.bench.accuracy.smoke_grid, digits), every regime
SMOKE = dict(data="digits", train_size=100, model="kmresnet", width=4, depth=2, modules=2,
             laps=2, batch_size=50, lr=0.05, tau=1.0, augment=False, epochs=2, device="cpu")
CHILD = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    import torch
    from edgetrain.config import RunConfig
    from edgetrain.method.precision import memory_format
    from edgetrain.regimes.schedule import train
    torch.set_num_threads(1)
    base = json.loads(sys.argv[1])
    done = []
    with tempfile.TemporaryDirectory() as d:
        for seed in (0, 1):
            for mode, transport in (("e2e", False), ("parallel", False), ("parallel", True),
                                    ("sequential", True), ("multilap", True)):
                cfg = RunConfig(**{**base, "mode": mode, "transport": transport, "seed": seed,
                                   "modules": 1 if mode == "e2e" else base["modules"]})
                m = train(cfg, Path(d) / f"{mode}-{transport}-{seed}")
                done.append(m["best_test_acc"])
    print("RESULT", json.dumps({"format": str(memory_format("cpu")), "runs": len(done)}))
""")


def run_smoke_grid(env: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SMOKE)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])  # an abort is -6, a segfault -11
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_the_format_follows_the_kernels():
    auto = lambda cap, dnnl, device="cpu": memory_format(device, "auto", cap, dnnl)  # noqa: E731
    assert auto("AVX512", True) == torch.channels_last
    assert auto("AVX512", False) == torch.preserve_format  # oneDNN held to AVX2
    for cap in ("AVX2", "DEFAULT", "SVE256", "ZVECTOR"):
        assert auto(cap, True) == torch.preserve_format
    assert auto("AVX512", True, "meta") == torch.preserve_format


def test_the_format_can_be_chosen_and_channels_last_is_refused_where_it_corrupts():
    assert memory_format("cpu", "contiguous", "AVX512", True) == torch.preserve_format
    assert memory_format("cpu", "channels-last", "AVX512", True) == torch.channels_last
    with pytest.raises(UserError, match="AVX-512"):
        memory_format("cpu", "channels-last", "AVX2", False)
    with pytest.raises(UserError, match="memory-format"):
        RunConfig(memory_format="nchw")


def test_cpu_modules_take_the_format_and_their_files_load_back(tmp_path):
    cfg = RunConfig(data="synthetic", input_shape=(3, 8, 8), synthetic_size=64, model="resnet20",
                    modules=2, mode="sequential", epochs=1, batch_size=16, device="cpu")
    run = build_run(cfg)
    convs = [m.weight for st in run.stages for m in st.modules() if isinstance(m, torch.nn.Conv2d)]
    cl = memory_format("cpu") == torch.channels_last
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(w.is_contiguous() for w in convs) is not cl  # the format really changed (or not)
    save_module(tmp_path, 0, run.stages[0])
    fresh = build_run(cfg).stages[0]
    for p in fresh.parameters():
        p.data.zero_()
    load_module(tmp_path, 0, fresh)
    for (n, a), (_, b) in zip(run.stages[0].state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n


def test_the_smoke_grid_runs_on_this_machines_kernels():
    res = run_smoke_grid({})
    assert res["runs"] == 10
    assert res["format"] == str(memory_format("cpu"))


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
                                 {"ONEDNN_MAX_CPU_ISA": "AVX2"}], ids=["aten+onednn", "onednn"])
def test_the_smoke_grid_runs_as_a_cpu_without_avx512(env):
    """The kernels that corrupted the heap: the guard keeps the default format there, also
    when only oneDNN is held to AVX2 (ATen's kernels still AVX-512)."""
    res = run_smoke_grid(env)
    assert res == {"format": str(torch.preserve_format), "runs": 10}
