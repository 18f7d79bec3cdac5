"""`edgetrain.wrap`: a user's nn.Module as blocks; equal shapes pay transport, others do not."""
import pytest
import torch
from torch import nn

import edgetrain
from edgetrain import models
from edgetrain.errors import UserError
from edgetrain.method.split import build_stages, split_depth
from edgetrain.method.stage import Prefix
from edgetrain.method.transport import transport_cost
from edgetrain.regimes.schedule import train
from tests.conftest import tiny_cfg


class UserNet(nn.Module):
    """Not an nn.Sequential: a stem, two shape-keeping and two shape-changing layers, a fc."""

    def __init__(self, c_in: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU())
        self.keep1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.grow = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.keep2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.keep2(self.grow(self.keep1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


BLOCKS = ["keep1", "grow", "keep2"]


def test_equal_shape_blocks_get_residue_t_minus_x_others_none():
    torch.manual_seed(0)
    user = UserNet()
    net = edgetrain.wrap(user, blocks=BLOCKS, stem="stem", in_shape=(1, 8, 8))
    x = net.stem(torch.randn(2, 1, 8, 8))
    out1, r1 = net.blocks[0](x)
    assert torch.equal(r1, user.keep1(x) - x)
    out2, r2 = net.blocks[1](out1)
    assert r2 is None and out2.shape == (2, 16, 4, 4)
    out3, r3 = net.blocks[2](out2)
    assert torch.equal(r3, out3 - out2)


def test_shape_changing_blocks_carry_no_transport_cost():
    torch.manual_seed(0)
    user = UserNet()
    net = edgetrain.wrap(user, blocks=BLOCKS, stem="stem")
    x = torch.randn(4, 1, 8, 8)
    z, residues = net(x)
    assert len(residues) == 2  # keep1 and keep2 only
    h = user.stem(x)
    a = user.keep1(h)
    b = user.grow(a)
    expected = (a - h).pow(2).mean() + (user.keep2(b) - b).pow(2).mean()
    assert torch.allclose(transport_cost(residues), expected)
    # grow's own parameters get no gradient from a module that holds grow alone
    stages = build_stages(net, [0, 1, 2, 3], "linear", 10, x)
    _, res = stages[1].forward_features(stages[0].features(x).detach())
    assert res == [] and transport_cost(res).item() == 0.0


def test_wrapped_stacked_modules_equal_the_user_model():
    torch.manual_seed(0)
    user = UserNet().eval()
    net = edgetrain.wrap(user, blocks=BLOCKS, stem="stem")
    x = torch.randn(3, 1, 8, 8)
    stages = build_stages(net, split_depth(3, 3), "dgl", 10, x)
    for s in stages:
        s.eval()
    with torch.no_grad():
        feats = Prefix(stages, features_only=True)(x)
        assert torch.equal(feats, user.keep2(user.grow(user.keep1(user.stem(x)))))
        assert torch.equal(user.fc(feats.mean((2, 3))), user(x))  # only the classifier is dropped


def test_sequential_is_split_into_its_children_and_tuple_blocks_pass_through():
    class Tupled(nn.Module):
        def forward(self, x):
            return 2 * x, x  # already (out, residue)

    seq = nn.Sequential(nn.Conv2d(1, 4, 1), Tupled(), nn.Flatten(), nn.Linear(4 * 9, 5))
    net = edgetrain.wrap(seq, in_shape=(1, 3, 3))
    assert len(net.blocks) == 4
    x = torch.randn(2, 1, 3, 3)
    z, residues = net(x)
    assert z.shape == (2, 5) and len(residues) == 1
    h = seq[0](x)
    assert torch.equal(residues[0], h)  # the Tupled block's own residue, unchanged


def test_wrap_user_errors_name_the_problem():
    user = UserNet()
    with pytest.raises(UserError, match="no submodule 'nope'"):
        edgetrain.wrap(user, blocks=["keep1", "nope"])
    with pytest.raises(UserError, match="name the blocks"):
        edgetrain.wrap(user)
    with pytest.raises(UserError, match="at least one"):
        edgetrain.wrap(user, blocks=[])
    with pytest.raises(UserError, match="block keep1 cannot take"):
        edgetrain.wrap(user, blocks=["keep1", "grow"], in_shape=(1, 8, 8))  # no stem: 1 channel
    with pytest.raises(UserError, match="submodule name or an nn.Module"):
        edgetrain.wrap(user, blocks=[3])


def test_edgetrain_wrap_is_callable_whatever_was_imported_first():
    import subprocess
    import sys
    code = ("import {first}; import edgetrain; from torch import nn; "
            "print(len(edgetrain.wrap(nn.Sequential(nn.ReLU(), nn.ReLU())).blocks))")
    for first in ("edgetrain", "edgetrain.models.wrap", "edgetrain.regimes.schedule"):
        out = subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True,
                             text=True, check=True).stdout
        assert out.strip() == "2"


@pytest.fixture
def user_model_registered(monkeypatch):
    def factory(in_shape, num_classes, width=None, depth=None):
        return edgetrain.wrap(UserNet(in_shape[0]), blocks=BLOCKS, stem="stem", in_shape=in_shape)
    monkeypatch.setitem(models._MODELS, "usernet", factory)
    return "usernet"


@pytest.mark.parametrize("mode", ["e2e", "parallel", "sequential", "multilap"])
def test_wrapped_model_trains_in_every_regime(user_model_registered, mode, tmp_path):
    cfg = tiny_cfg(model=user_model_registered, mode=mode, width=None, depth=None, modules=3,
                   train_size=120, epochs=2, laps=2)
    m = train(cfg, tmp_path / mode)
    n = 1 if mode == "e2e" else 3
    assert m["n_modules"] == n and all(mod["steps"] > 0 for mod in m["modules"])
    if mode != "e2e":
        transports = [mod["transport"] for mod in m["modules"]]
        assert transports[0] > 0 and transports[1] == 0.0 and transports[2] > 0  # grow: none
