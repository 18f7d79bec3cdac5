"""Shared fixtures: tiny configurations that train in seconds on 2 CPU cores."""
from __future__ import annotations

import pytest
import torch

from edgetrain.config import RunConfig

torch.set_num_threads(2)


def tiny_cfg(**kw) -> RunConfig:
    """A kmresnet of width 8 and 4 blocks on 400 digits: seconds per regime."""
    base = dict(data="digits", train_size=400, model="kmresnet", width=8, depth=4, modules=2,
                epochs=2, laps=2, batch_size=64, lr=0.05, seed=0)
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture
def tiny():
    return tiny_cfg


@pytest.fixture(autouse=True)
def _own_profiles_dir(tmp_path_factory, monkeypatch):
    """Calibrated profiles go to a fresh directory per test, never the user's ~/.config."""
    monkeypatch.setenv("EDGETRAIN_DEVICES_DIR", str(tmp_path_factory.mktemp("user-devices")))
