"""The research studies' tests: same threads and user-directory isolation as tests/."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _own_profiles_dir(tmp_path_factory, monkeypatch):
    """Calibrated profiles go to a fresh directory per test, never the user's ~/.config."""
    monkeypatch.setenv("EDGETRAIN_DEVICES_DIR", str(tmp_path_factory.mktemp("user-devices")))
