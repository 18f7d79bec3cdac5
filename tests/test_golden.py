"""Fixed-seed digits runs of every regime give the metrics recorded in tests/golden/.

The recorded files were made by `python -m tests.golden.record`; fields that measure the
machine (timings, peak RSS, memory, device, version) are left out. A change that alters
results on purpose re-records them and says why in its commit.
"""
from __future__ import annotations

import json

import pytest

from tests.golden.record import HERE, REGIMES, run_regime


@pytest.mark.parametrize("name", list(REGIMES))
def test_regime_metrics_equal_the_recorded_ones(name, tmp_path):
    expected = json.loads((HERE / f"{name}.json").read_text())
    got = json.loads(json.dumps(run_regime(name, tmp_path / "run")))  # tuples -> lists
    assert got == expected
