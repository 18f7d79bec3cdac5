"""Auxiliary heads: the light DGL head for wide maps, `auto`'s per-module choice, and the
resolved kinds recorded in config.json (never `auto`)."""
from __future__ import annotations

import json

import pytest
import torch

from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.method.heads import LIGHT_ABOVE, head_spec, light_width, make_head, resolve_heads
from edgetrain.regimes.schedule import train
from tests.conftest import tiny_cfg


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_the_light_head_is_much_smaller_on_wide_maps_and_classifies():
    shape = (2048, 2, 2)  # ResNet-50's last maps at 64x64 inputs
    dgl, light = make_head("dgl", shape, 10), make_head("dgl-light", shape, 10)
    assert _params(light) < _params(dgl) / 50
    assert light(torch.randn(3, *shape)).shape == (3, 10)
    assert light_width(2048) == 128 and light_width(64) == 16


def test_auto_picks_the_light_head_only_above_the_threshold():
    shapes = [(64, 8, 8), (LIGHT_ABOVE, 4, 4), (LIGHT_ABOVE + 1, 2, 2), (5, 96)]
    kinds = resolve_heads("auto", shapes)
    assert kinds == ["dgl-k1", "dgl-k1", "dgl-light", "dgl-k1"]
    assert head_spec(kinds) == "dgl-k1,dgl-k1,dgl-light,dgl-k1"
    assert head_spec(["dgl"] * 3) == "dgl"
    assert resolve_heads("dgl,dgl-light", shapes[:2]) == ["dgl", "dgl-light"]
    with pytest.raises(UserError, match="2 kinds for 3 modules"):
        resolve_heads("dgl,dgl-light", shapes[:3])


def test_config_json_records_the_resolved_head(tmp_path):
    train(tiny_cfg(mode="parallel", epochs=1, train_size=100), tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["head"] == "dgl-k1"  # width-8 maps: the 1x1 strided DGL head, never "auto"
    assert RunConfig.load(tmp_path / "run" / "config.json").head == "dgl-k1"


def test_the_strided_head_convolves_a_quarter_of_the_positions_and_classifies():
    from torch import nn
    for shape, conv_out in (((16, 32, 32), (16, 16)), ((64, 7, 7), (4, 4)), ((8, 3, 3), (3, 3))):
        s2, full = make_head("dgl-s2", shape, 10), make_head("dgl", shape, 10)
        assert _params(s2) == _params(full)  # same weights; only the conv's stride differs
        conv = next(m for m in s2 if isinstance(m, nn.Conv2d))
        x = torch.randn(2, *shape)
        assert tuple(conv(x).shape[2:]) == conv_out  # maps under STRIDE_FROM keep stride 1
        assert s2(x).shape == (2, 10)


def test_the_k1_head_is_the_strided_head_with_a_1x1_conv():
    from torch import nn
    for shape in ((16, 32, 32), (64, 7, 7), (8, 3, 3)):
        k1, s2 = make_head("dgl-k1", shape, 10), make_head("dgl-s2", shape, 10)
        c1, c3 = (next(m for m in h if isinstance(m, nn.Conv2d)) for h in (k1, s2))
        assert c1.kernel_size == (1, 1) and c1.stride == c3.stride
        assert _params(k1) == _params(s2) - c3.weight.numel() + c1.weight.numel()
        x = torch.randn(2, *shape)
        assert c1(x).shape == c3(x).shape and k1(x).shape == (2, 10)


def test_a_0_2_0_run_with_dgl_heads_rebuilds_them(tmp_path):
    """config.json records the resolved kinds, so a run made when auto meant dgl keeps dgl."""
    train(tiny_cfg(mode="parallel", epochs=1, train_size=100, head="dgl"), tmp_path / "run")
    from edgetrain.regimes.run import load_run
    run = load_run(tmp_path / "run")
    assert [st.head_kind for st in run.stages] == ["dgl", "dgl"]


@pytest.mark.parametrize("bad", ["nope", "dgl,auto", "dgl,,linear"])
def test_bad_head_values_are_user_errors(bad):
    with pytest.raises(UserError, match="--head"):
        RunConfig(head=bad)
