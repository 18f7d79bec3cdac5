"""Fixed-seed digits runs of every regime give the metrics recorded in tests/regimes/golden/.

The recorded files were made by `python -m tests.regimes.golden.record`; fields that measure the
machine (timings, peak RSS, memory, device, version) are left out. A change that alters
results on purpose re-records them and says why in its commit.

They hold on any CPU: counts, depths and accuracies exactly, losses and transport within
`REL_TOL` (tests/regimes/golden/record.py says why). `.ci/run` runs them once more under
`ATEN_CPU_CAPABILITY=default`, the kernels of a CPU without AVX. The exact promise stays where
it is true: two runs on one machine, and a resumed run against an uninterrupted one, are
bit-identical (tests/regimes/test_reliability.py, tests/regimes/test_faults.py).
"""
from __future__ import annotations

import json

import pytest

from tests.regimes.golden.record import HERE, REGIMES, mismatches, run_regime


def _recorded(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


@pytest.mark.parametrize("name", list(REGIMES))
def test_golden_regime_metrics_match_the_recorded_ones(name, tmp_path):
    got = json.loads(json.dumps(run_regime(name, tmp_path / "run")))  # tuples -> lists
    assert mismatches(_recorded(name), got) == []


def test_golden_comparison_catches_one_changed_hyper_parameter(tmp_path):
    """The tolerance is no blanket: lr 0.05 -> 0.0505 (1%) fails the sequential record."""
    got = json.loads(json.dumps(run_regime("sequential", tmp_path / "run", lr=0.0505)))
    assert mismatches(_recorded("sequential"), got)


def test_golden_comparison_rules():
    rec = {"n": 3, "val_acc": 0.5, "loss": 1.0, "m": [{"transport": 0.0}], "mode": "e2e"}
    assert mismatches(rec, {**rec, "loss": 1.0 + 5e-5}) == []  # inside the tolerance
    assert mismatches(rec, {**rec, "loss": 1.0 + 5e-4})  # outside it
    assert mismatches(rec, {**rec, "val_acc": 0.5 + 1e-9})  # accuracies are exact
    assert mismatches(rec, {**rec, "n": 4}) and mismatches(rec, {**rec, "mode": "sequential"})
    assert mismatches(rec, {**rec, "m": [{"transport": 5e-8}]}) == []  # zero up to rounding
    assert mismatches(rec, {**rec, "extra": 1}) and mismatches(rec, {**rec, "m": []})
