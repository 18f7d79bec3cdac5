"""`edgetrain bench cap` on a tiny configuration: e2e fails under the cap, edgetrain completes."""
from __future__ import annotations

import json

import pytest

from edgetrain.bench.cap import bench_cap


@pytest.mark.slow
def test_bench_cap_tiny_e2e_fails_edgetrain_completes(tmp_path):
    # 3x64x64 batch 32: activations dominate; one thread, one step: about 45 s on 2 cores
    res = bench_cap("resnet56", (3, 64, 64), 32, 8, "sequential", steps=1, threads=1,
                    max_probes=0, out_dir=tmp_path)
    saved = json.loads(open(res["json_path"]).read())
    at = saved["at_min_cap"]
    assert saved["uncapped"]["e2e"]["completed"] and saved["uncapped"]["edgetrain"]["completed"]
    assert not at["e2e"]["completed"], at["e2e"]
    assert at["edgetrain"]["completed"], at["edgetrain"]["error"]
    assert "allocate" in at["e2e"]["error"] or "Memory" in at["e2e"]["error"]
    assert 0 < saved["min_cap_fraction_of_e2e_peak_above_runtime"] < 1
    assert saved["limit"].startswith("RLIMIT_AS")
    assert saved["runtime_warm_address_space_mib"] > saved["runtime_import_address_space_mib"]
    assert saved["bisection"]["verified_upper_cap_mib"] == saved["min_cap_mib"]  # no probes
