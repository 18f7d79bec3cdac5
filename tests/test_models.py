import pytest
import torch

from edgetrain.errors import UserError
from edgetrain.method.split import build_stages, split_depth
from edgetrain.method.stage import Prefix
from edgetrain.models import create_model, list_models

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def small_kw(name):
    if name.startswith("vgg"):
        return {"width": 8}
    return {"width": 4}


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", SHAPES)
def test_stacked_modules_equal_whole_network(name, shape):
    torch.manual_seed(0)
    net = create_model(name, shape, 10, **small_kw(name))
    x = torch.randn(3, *shape)
    k = min(3, len(net.blocks))
    stages = build_stages(net, split_depth(len(net.blocks), k), "dgl", 10, x)
    net.eval()
    for s in stages:
        s.eval()
    whole, _ = net(x)
    stacked = Prefix(stages, features_only=True)(x)
    assert torch.equal(whole, stacked)
    logits = Prefix(stages)(x)
    assert logits.shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet20", "kmresnet", "vgg11"])
def test_stl_sized_input(name):
    net = create_model(name, (3, 96, 96), 10, width=4)
    out, res = net(torch.randn(2, 3, 96, 96))
    assert out.shape[0] == 2 and len(res) >= 1


def test_residue_is_exact_for_identity_blocks():
    net = create_model("resnet8", (1, 8, 8), 10, width=4)
    blk = net.blocks[0]
    x = torch.randn(2, 4, 8, 8)
    out, r = blk(x)
    assert torch.allclose(out, x + r)


def test_vgg_shape_changing_layers_carry_no_residue():
    net = create_model("vgg11", (3, 32, 32), 10, width=8)
    x = net.stem(torch.randn(1, 3, 32, 32))
    out, r = net.blocks[0](x)  # 3 -> 8 channels and a pool
    assert r is None
    x, _ = net.blocks[3](net.blocks[2](net.blocks[1](out)[0])[0])
    out, r = net.blocks[3](x)
    if out.shape == x.shape:
        assert torch.allclose(r, out - x)


def test_resnet_depth_rule_and_unknown_model():
    with pytest.raises(UserError):
        create_model("resnet20", (1, 8, 8), 10, depth=21)
    with pytest.raises(UserError, match="unknown model"):
        create_model("nope", (1, 8, 8), 10)
