"""TRGL's transport term without extra saved residues (`DeltaEnergy`, `Stage.forward_transport`).

The new path must give exactly the old path's loss and, up to float rounding, its gradients
(the old path: `Stage.forward_features` then `transport_cost(residues)`, which saves every
residue), and must save less for backward.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import edgetrain
from edgetrain.config import RunConfig
from edgetrain.measure import saved_activation_bytes
from edgetrain.method.loop import make_trainer, stage_loss
from edgetrain.method.split import build_stages, split_depth
from edgetrain.method.transport import DeltaEnergy, transport_cost
from edgetrain.models import create_model, list_models

TAU = 0.05  # small enough that the transport term moves the gradients visibly
SHAPE = (3, 16, 16)
# every registered model, CPU-sized: (width, depth)
SIZES = {**{f"resnet{n}": (4, None) for n in (8, 14, 20, 32, 44, 56, 110)},
         "kmresnet": (8, 4), "vgg11": (8, None), "vgg19": (4, None), "vit": (32, 3),
         "swin_t": (32, None), **{a: (4, None) for a in ("resnet18", "resnet50", "resnet101",
                                                        "resnet152")}}


class UserNet(nn.Module):
    """A user's model for `edgetrain.wrap`: plain layers, a shape change, a tuple block."""

    class Tupled(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, 1, 1)

        def forward(self, x):
            h = torch.tanh(self.conv(x))
            return x + 0.5 * h, h  # (out, residue): its residue is not out - x

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.keep1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1))
        self.grow = nn.Conv2d(8, 16, 3, 2, 1)
        self.own = self.Tupled(16)
        self.keep2 = nn.Sequential(nn.BatchNorm2d(16), nn.Tanh(), nn.Conv2d(16, 16, 3, 1, 1))


def _net(name: str):
    if name == "wrap":
        return edgetrain.wrap(UserNet(), blocks=["keep1", "grow", "own", "keep2"], stem="stem")
    width, depth = SIZES[name]
    return create_model(name, SHAPE, 10, width=width, depth=depth)


def _old_loss(st, x, y, scaling):
    z, residues = st.forward_features(x)
    return F.cross_entropy(st.head(z), y) + transport_cost(residues, scaling) / (2 * TAU)


def _new_loss(st, x, y, scaling):
    z, w = st.forward_transport(x, scaling)
    return F.cross_entropy(st.head(z), y) + w / (2 * TAU)


def _grads(loss_fn, st, x, y, scaling):
    """Loss and gradients (parameters, then the input) of one train-mode step, fixed RNG.

    In float64: the two paths round differently (r against out - x), and in float32 a
    gradient entry whose terms cancel differs by ~1e-5 absolute between any two summation
    orders; in float64 any difference beyond rounding is a wrong gradient."""
    st.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)  # swin's stochastic depth draws the same rows for both paths
    loss = loss_fn(st, x, y, scaling)
    loss.backward()
    return loss.detach(), [p.grad for p in st.parameters() if p.grad is not None] + [x.grad]


def test_every_registered_model_is_covered():
    assert set(list_models()) <= set(SIZES)


# The fast suite covers every block class once; deeper variants of the same classes are slow.
FAST = {"resnet8", "resnet20", "kmresnet", "vgg11", "vit", "swin_t", "resnet18", "resnet50",
        "wrap"}
NAMES = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
         for n in sorted(SIZES) + ["wrap"]]


@pytest.mark.parametrize("scaling", ["mean", "sample"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_transport_matches_the_saved_residue_path(name, scaling):
    torch.manual_seed(0)
    net = _net(name).double()
    x, y = torch.randn(4, *SHAPE, dtype=torch.double), torch.randint(0, 10, (4,))
    stages = build_stages(net, split_depth(len(net.blocks), 2), "linear", 10, x)
    for st in stages:
        st.double()  # module 1 gets the detached features of module 0, as in training
        st.train()
        loss_old, g_old = _grads(_old_loss, st, x, y, scaling)
        loss_new, g_new = _grads(_new_loss, st, x, y, scaling)
        assert torch.equal(loss_new, loss_old)
        assert len(g_new) == len(g_old) > 1
        for a, b in zip(g_new, g_old):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
        with torch.no_grad():
            x = st.features(x)


def test_delta_energy_is_the_energy_and_its_gradient_is_2_r_dr_dx():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double()
    for scaling in ("mean", "sample"):
        x = torch.randn(3, 6, dtype=torch.double, requires_grad=True)
        out = x + torch.sin(lin(x))
        r = out - x
        w = DeltaEnergy.apply(x, out, r, scaling)
        assert torch.equal(w, transport_cost([r.detach()], scaling))
        (gx,) = torch.autograd.grad(w, x)
        rr = torch.sin(lin(x))  # dW/dx = c r dr/dx, c = 2/numel (mean) or 2/batch (sample)
        c = 2 / rr.numel() if scaling == "mean" else 2 / rr.shape[0]
        want = torch.autograd.grad(rr, x, grad_outputs=c * rr.detach())[0]
        assert torch.allclose(gx, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="out - x"):
        DeltaEnergy.apply(x, out[:, :3], r, "mean")


@pytest.mark.parametrize("name", NAMES)
def test_blocks_declare_whether_their_residue_is_their_displacement(name):
    torch.manual_seed(0)
    net = _net(name).train()
    with torch.no_grad():
        h = net.stem(torch.randn(2, *SHAPE))
        for blk in net.blocks:
            out, r = blk(h)
            if r is not None and getattr(blk, "residue_is_delta", False):
                assert torch.allclose((out - h).reshape(r.shape), r, atol=1e-5)
            h = out


def test_a_wrapped_block_with_its_own_residue_is_not_a_displacement():
    wrapped = _net("wrap")
    wrapped(torch.randn(2, *SHAPE))
    assert [b.residue_is_delta for b in wrapped.blocks] == [True, True, False, True]


def _step_saved_bytes(stage, cfg, x, y, path: str) -> int:
    tr = make_trainer(stage, cfg, 0, 3, 10, transport=path != "vangl")
    if path == "old":
        return saved_activation_bytes(lambda: _old_loss(stage, x, y, "mean"), exclude=[x])[0]
    return saved_activation_bytes(lambda: stage_loss(tr, x, y, 0.0, "mean")[0], exclude=[x])[0]


def test_trgl_saves_what_vangl_saves_plus_only_projection_residues():
    torch.manual_seed(0)
    cfg = RunConfig(data="digits", model="resnet20", modules=1)
    net = create_model("resnet20", (3, 32, 32), 10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for bounds in ([0, 3, 9], [0, 9]):  # module 0 of 2: identity blocks only; all 9 blocks
        st = build_stages(net, bounds, "dgl", 10, x)[0].train()
        with torch.no_grad():  # a projection block's residue is saved: one map each
            h, extra = st.stem(x), 0
            for blk in st.blocks:
                h, r = blk(h)
                extra += 0 if blk.residue_is_delta else r.numel() * r.element_size()
        assert (extra == 0) == (len(st.blocks) == 3)
        trgl, vangl, old = (_step_saved_bytes(st, cfg, x, y, p) for p in ("trgl", "vangl", "old"))
        assert trgl == vangl + extra
        assert trgl < old


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of the storages alive (from the operator that made them until freed)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._refs = {}

    def _free(self, key, n):
        if self._refs.pop(key, None) is not None:
            self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self._refs:
                st, key = t.untyped_storage(), t.untyped_storage()._cdata
                n = st.nbytes()
                self._refs[key] = weakref.ref(st, lambda _, k=key, n=n: self._free(k, n))
                self.now += n
                self.peak = max(self.peak, self.now)
        return out


def test_features_under_no_grad_keeps_no_residue_alive():
    torch.manual_seed(0)
    net = create_model("resnet20", (3, 32, 32), 10)
    x = torch.randn(8, 3, 32, 32)
    st = build_stages(net, [0, 3, 9], "dgl", 10, x)[0].eval()
    peaks = {}
    with torch.no_grad():
        for name, fn in (("features", st.features), ("residues", st.forward_features)):
            with _PeakBytes() as m:
                z = fn(x)
                del z
            peaks[name] = m.peak
    fmap = 8 * 16 * 32 * 32 * 4  # one (B, C, H, W) float map of module 0
    assert peaks["features"] + fmap <= peaks["residues"]  # residues kept: at least one map more


@pytest.mark.parametrize("model", ["resnet20", "vit", "swin_t", "resnet18"])
def test_delta_energy_into_the_residue_gives_the_same_gradients(model):
    """`into_residue` (the recomputed path's backward: c*r*g into r alone, one temporary
    instead of out - x and its negation) reaches every parameter and the input with the
    same gradient as the default, and the value of `value=False` is only a placeholder."""
    torch.manual_seed(0)
    width, depth = SIZES[model]
    net = create_model(model, SHAPE, 10, width, depth)
    blk = next(b for b in net.blocks if b(net.stem(torch.randn(2, *SHAPE)))[1] is not None
               and getattr(b, "residue_is_delta", False))
    x0 = net.stem(torch.randn(4, *SHAPE)).detach()
    grads = []
    for into in (False, True):
        x = x0.clone().requires_grad_(True)
        blk.zero_grad()
        out, r = blk(x)
        w = DeltaEnergy.apply(x, out, r, "mean", True, into)
        assert float(w.detach()) == pytest.approx(float(transport_cost([r.detach()])), rel=1e-6)
        (out.sum() * 1e-3 + w).backward()
        grads.append([x.grad] + [p.grad.clone() for p in blk.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    out, r = blk(x0)
    assert float(DeltaEnergy.apply(x0, out, r, "mean", False)) == 0.0
