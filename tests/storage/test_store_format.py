"""The streaming safetensors writer: files that safetensors itself reads back exactly."""
import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
import torch

from edgetrain.storage.codec import save_tensors
from edgetrain.storage.modules import load_optimizer_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "step": torch.tensor(7, dtype=torch.int64),
            "empty": torch.zeros(0, 3), "half": torch.randn(5, generator=g).half(),
            "bf": torch.randn(2, 2, generator=g).to(torch.bfloat16),
            "strided": torch.randn(4, 3, generator=g).t(), "mask": torch.tensor([True, False]),
            "optim.0.momentum_buffer": torch.randn(6, generator=g)}


def test_round_trip_every_dtype_and_layout(tmp_path):
    t = _tensors()
    save_tensors(tmp_path / "m.safetensors", t, {"trainer": json.dumps({"step": 3}), "n": 2})
    back = load_file(str(tmp_path / "m.safetensors"))
    assert set(back) == set(t)
    for name, v in t.items():
        assert back[name].dtype == v.dtype and torch.equal(back[name], v.contiguous()), name
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == {"trainer": '{"step": 3}', "n": "2"}


def test_file_matches_the_reference_writer_byte_for_byte_in_data(tmp_path):
    """Same tensors through safetensors' own writer: identical data section and tensors."""
    from safetensors.torch import save_file
    t = {k: v.contiguous() for k, v in _tensors().items()}
    save_tensors(tmp_path / "ours.safetensors", t)
    save_file(t, str(tmp_path / "ref.safetensors"))
    ours, ref = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert all(torch.equal(ours[k], ref[k]) for k in t)


def test_optimizer_tensors_only(tmp_path):
    save_tensors(tmp_path / "m.safetensors", _tensors())
    opt = load_optimizer_tensors(tmp_path / "m.safetensors")
    assert list(opt) == ["optim.0.momentum_buffer"]


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"])
def test_optimizer_tensors_of_a_corrupt_file_is_a_user_error(tmp_path, content):
    from edgetrain.errors import UserError
    (tmp_path / "m.safetensors").write_bytes(content)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_optimizer_tensors(tmp_path / "m.safetensors")
