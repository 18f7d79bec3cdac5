"""The model registry and CIFAR/K-M ResNets, VGG; torchvision ResNets, the ViT and swin_t (issue 10): equivalence with torchvision, residues,
every regime, the memory-balanced split and ONNX export, at tiny widths."""
import pytest
import torch
from edgetrain.errors import UserError
from edgetrain.method.stage import Prefix
from edgetrain.models import create_model, list_models
import torchvision
from edgetrain.method.split import block_activation_bytes, build_stages, split_depth, split_memory
from edgetrain.models.swin import adapt_swin, swin_tiny
from edgetrain.models.tv_resnet import ScaledResNet, adapt_resnet, torchvision_resnet
from edgetrain.models.vit import num_heads, patch_size
from edgetrain.regimes.schedule import train
from tests.conftest import tiny_cfg


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


# ---------------------------------------------------------------------- (was test_models_extra.py)
EXTRA = ["resnet18", "resnet50", "resnet101", "resnet152", "vit", "swin_t"]
# resnet101/152 differ from resnet50 only in how many Bottlenecks layer3/layer4 repeat: their
# heavier training and export runs are marked slow; every fast invariant covers all six.
FAST = ["resnet18", "resnet50", "vit", "swin_t"]
ALL = FAST + [pytest.param(n, marks=pytest.mark.slow) for n in ("resnet101", "resnet152")]


def test_extra_models_are_registered():
    assert set(EXTRA) <= set(list_models())


@torch.no_grad()
def _tv_features(model, x):
    m = model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def test_adapter_equals_torchvision_forward():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).eval()
    net = adapt_resnet(tv, 3, "imagenet").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x)[0], _tv_features(tv, x))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_every_block_equals_torchvision_block_forward(arch):
    net = torchvision_resnet(arch, (3, 32, 32), width=4).eval()
    x = net.stem(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        for blk in net.blocks:
            out, _ = blk(x)
            assert torch.equal(out, blk.block(x))  # torchvision's own BasicBlock/Bottleneck
            x = out


def test_scaled_resnet_at_width_64_is_torchvision_resnet50():
    tv = torchvision.models.resnet50(weights=None)
    ours = ScaledResNet("bottleneck", [3, 4, 6, 3], 64)
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    res = ours.load_state_dict(sd, strict=True)  # same names, same shapes, nothing missing
    assert not res.missing_keys and not res.unexpected_keys


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_residue_is_out_minus_shortcut(arch):
    net = torchvision_resnet(arch, (3, 32, 32), width=4).eval()
    x = net.stem(torch.randn(2, 3, 32, 32))
    kinds = set()
    for blk in net.blocks:
        out, r = blk(x)
        ds = blk.block.downsample
        shortcut = x if ds is None else ds(x)
        kinds.add(ds is None)
        assert torch.allclose(out, shortcut + r, atol=1e-6)
        assert (out >= 0).all()  # torchvision's ReLU after the addition is kept
        x = out
    assert kinds == {True, False}  # identity and projection blocks both checked


@pytest.mark.parametrize("shape,side", [((1, 8, 8), 1), ((1, 28, 28), 4), ((3, 32, 32), 4),
                                        ((3, 64, 64), 2)])
def test_resnet_stem_never_shrinks_the_map_below_1x1(shape, side):
    net = create_model("resnet50", shape, 10, width=4)
    out, _ = net(torch.randn(2, *shape))
    assert out.shape[-2:] == (side, side)


def test_resnet_rejects_bad_stem_and_depth():
    with pytest.raises(UserError, match="stem"):
        torchvision_resnet("resnet18", (3, 32, 32), 4, stem="vgg")
    with pytest.raises(UserError, match="fixed depth"):
        create_model("resnet50", (3, 32, 32), 10, width=4, depth=20)
    with pytest.raises(UserError, match="fixed depth"):
        create_model("swin_t", (3, 32, 32), 10, width=4, depth=20)


def test_vit_residue_is_both_branches():
    net = create_model("vit", (3, 32, 32), 10, width=8, depth=2).eval()
    x = net.stem(torch.randn(2, 3, 32, 32))  # (B, N, D) tokens
    assert x.shape == (2, 64, 8)
    blk = net.blocks[0]
    out, r = blk(x)
    y = x + blk.attn(blk.ln1(x))
    assert torch.allclose(r, (y - x) + blk.mlp(blk.ln2(y)), atol=1e-6)
    assert torch.allclose(out, x + r, atol=1e-6)


def test_vit_sizes():
    assert [patch_size(s, s) for s in (8, 28, 32, 64, 96)] == [1, 4, 4, 8, 12]
    assert [num_heads(d) for d in (4, 96, 100, 192)] == [1, 3, 2, 6]
    assert len(create_model("vit", (1, 8, 8), 10, width=8, depth=3).blocks) == 3


def test_swin_adapter_equals_torchvision_features():
    from torchvision.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    sw = SwinTransformer([2, 2], 16, [2, 2, 6, 2], [1, 1, 2, 4], [7, 7]).eval()
    net = adapt_swin(sw, (16, 16)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = sw.features(x)  # (B, 2, 2, 128)
        assert torch.equal(net(x)[0], ref.flatten(1, 2))
    merging = [b for b in net.blocks if b.merge is not None]
    assert len(net.blocks) == 12 and len(merging) == 3


@pytest.mark.slow
def test_swin_at_width_96_is_torchvision_swin_t():
    ours = swin_tiny((3, 224, 224)).blocks
    ref = torchvision.models.swin_t(weights=None)
    n_ref = sum(p.numel() for n, p in ref.named_parameters()
                if n.startswith("features.") and not n.startswith("features.0."))
    assert sum(p.numel() for p in ours.parameters()) == n_ref


def _small(name):
    return {"width": 8 if name in ("vit", "swin_t") else 4}


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("shape", [(3, 64, 64)])
def test_stacked_modules_equal_whole_network_at_64px(name, shape):
    # tests/models/test_models.py covers 1x8x8, 1x28x28 and 3x32x32 for every registered model (all six
    # of these included); 64 px switches the ResNets to the ImageNet stem and the ViT to p = 8
    torch.manual_seed(0)
    net = create_model(name, shape, 10, **_small(name))
    x = torch.randn(2, *shape)
    stages = build_stages(net, split_depth(len(net.blocks), 4), "dgl", 10, x)
    net.eval()
    for s in stages:
        s.eval()
    with torch.no_grad():
        assert torch.equal(net(x)[0], Prefix(stages, features_only=True)(x))
        assert Prefix(stages)(x).shape == (2, 10)


@pytest.mark.parametrize("name", EXTRA)
def test_memory_split_differs_by_less_than_heaviest_block(name):
    torch.manual_seed(0)
    net = create_model(name, (3, 32, 32), 10, **_small(name))
    x = torch.randn(4, 3, 32, 32)
    costs = block_activation_bytes(net, x)
    b = split_memory(net, 4, x)
    runs = [sum(costs[a:c]) for a, c in zip(b[:-1], b[1:])]
    assert len(runs) == 4 and b[-1] == len(net.blocks)
    assert max(runs) - min(runs) < max(costs)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("mode", ["e2e", "parallel", "sequential", "multilap"])
def test_every_regime_runs_a_few_steps(name, mode, tmp_path):
    cfg = tiny_cfg(model=name, mode=mode, data="synthetic", input_shape=(3, 16, 16),
                   synthetic_size=40, train_size=None, epochs=2 if mode == "multilap" else 1,
                   laps=2, batch_size=16,
                   modules=3, split="memory", depth=None, **_small(name))
    m = train(cfg, tmp_path / mode)
    n = 1 if mode == "e2e" else 3
    assert m["n_modules"] == n and len(list((tmp_path / mode / "modules").glob("*"))) == n
    for mod in m["modules"]:
        assert mod["steps"] > 0 and mod["train_loss"] == mod["train_loss"]  # not NaN
        if mode != "e2e":
            assert mod["transport"] > 0  # every module of these models has residues


@pytest.mark.parametrize("name", ["resnet18"] + [pytest.param(n, marks=pytest.mark.slow) for n in
                                                   ("resnet50", "vit", "swin_t", "resnet101",
                                                    "resnet152")])
def test_prefix_exports_to_onnx(name):  # torch.export takes 5-30 s a model: one in the fast suite
    # the exporter of `edgetrain export` (torch.export, dynamic batch) and its ORT check
    export = pytest.importorskip("edgetrain.export.onnx_export")
    onnx_check = pytest.importorskip("edgetrain.export.onnx_check")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    shape = (3, 32, 32)
    net = create_model(name, shape, 10, **_small(name))
    stages = build_stages(net, split_depth(len(net.blocks), 3), "dgl", 10, torch.randn(2, *shape))
    prefix = Prefix(stages[:2]).eval()
    proto = export.export_onnx(prefix, torch.randn(2, *shape), export.DEFAULT_OPSET, "logits")
    sess = onnx_check.ort_session(proto.SerializeToString())
    xs = [torch.randn(b, *shape) for b in (1, 7)]
    diffs = onnx_check.batch_agreement(sess, prefix, xs)
    with torch.no_grad():
        scale = max(float(prefix(x).abs().max()) for x in xs)
    # untrained deep nets give logits of ~1e2-1e3 in eval mode: compare relatively
    assert max(diffs.values()) < 1e-4 * max(1.0, scale)
