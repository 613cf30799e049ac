"""InherConv2d: Conv2d inheritance. The kernel (C_out, C_in, k, k) is factored as the map (C_out, C_in·k·k) on
unfolded patches; at init an inherited HF ResNet computes exactly the ResNet whose stage convolutions are replaced by
their rank-r kernels (float64); parameter counts are exact; save/load and dequantize are exact."""

import copy

import pytest
import torch
import transformers as T
from torch import nn

import inhernet_hf  # noqa: F401  (AutoModel* read inherited checkpoints)
from inhernet_hf import InherConfig, InherLinear, get_inher_model, inher_num_params
from inhernet_hf.conv import InherConv2d
from inhernet_hf.targets import dense_weight
from reference import rank_r_reference, rel_err

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _convs(model):
    return {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}


def _resnet(layer_type="basic"):
    torch.manual_seed(0)
    return T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2], layer_type=layer_type,
        num_labels=5)).double().eval()


# HF conv models: (builder, the block list all targets live in, the stem that stays dense)
VISION = {
    "resnet-basic": (lambda: _resnet("basic"), "resnet.encoder.stages.", "resnet.embedder.embedder.convolution"),
    "resnet-bottleneck": (lambda: _resnet("bottleneck"), "resnet.encoder.stages.",
                          "resnet.embedder.embedder.convolution"),
    "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=3)),
        "convnext.encoder.stages.", "convnext.embeddings.patch_embeddings"),
    "regnet": (lambda: T.RegNetForImageClassification(T.RegNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=3)),
        "regnet.encoder.stages.", "regnet.embedder.embedder.convolution"),
    "mobilenet_v2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=3)), "mobilenet_v2.layer.",
        "mobilenet_v2.conv_stem.first_conv.convolution"),
}


@pytest.mark.parametrize("name", list(VISION))
def test_inherited_conv_models_are_their_rank_r_models_at_init(name):
    """Default targets: the dense convolutions (and Linear layers) inside the stages; the stem, the classifier and
    every depthwise / grouped convolution stay dense. Whole-model logits equal the rank-r model's (float64)."""
    build, blocks, stem = VISION[name]
    torch.manual_seed(0)
    model = build().double().eval()
    reference = copy.deepcopy(model)
    convs = _convs(model)
    inher = get_inher_model(model, InherConfig(target_ratio=0.5, num_heads=2), progressbar=False)
    rows = inher.inher_report.rows
    targeted = {r.name for r in rows}
    assert targeted >= {n for n, m in convs.items() if n.startswith(blocks) and m.groups == 1}
    assert all(n.startswith(blocks) for n in targeted)
    assert stem in convs and type(inher.get_submodule(stem)) is nn.Conv2d
    grouped = [n for n, m in convs.items() if m.groups > 1]
    assert all(type(inher.get_submodule(n)) is nn.Conv2d for n in grouped)
    with torch.no_grad():
        for row in rows:
            if row.inherited:
                dense = reference.get_submodule(row.name)
                w_r = rank_r_reference(dense_weight(dense), row.rank)
                dense.weight.copy_(w_r.view_as(dense.weight))
        assert rel_err(inher(pixel_values=PIXELS).logits, reference(pixel_values=PIXELS).logits) < 1e-9
    for row in rows:  # parameter counts: the module's, the formula's and the report's agree
        layer = inher.get_submodule(row.name)
        if row.inherited and isinstance(layer, InherConv2d):
            assert layer.num_params() == row.params == inher_num_params(row.in_features, row.out_features, row.rank,
                                                                        2, row.bias)
    assert inher.inher_report.ratio <= 0.5


def test_one_conv_layer_matches_the_rank_r_convolution_with_its_geometry():
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2, bias=True).double()
    layer = InherConv2d(dense, rank=4, num_heads=3, dtype=torch.float64)
    layer.inherit_(dense.weight.flatten(1), dense.bias)
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    w_r = rank_r_reference(dense.weight.flatten(1), 4).view_as(dense.weight)
    expected = nn.functional.conv2d(x, w_r, dense.bias, stride=2, padding=2, dilation=2)
    assert rel_err(layer(x), expected) < 1e-12
    # heads apart: the output is the gated sum of the heads, position by position
    with torch.no_grad():
        layer.inher_up.weight.add_(0.1 * torch.randn_like(layer.inher_up.weight))
        layer.inher_bias.add_(torch.randn_like(layer.inher_bias))
    h = layer.inher_down(x)
    g = torch.softmax(layer.inher_gate(h), dim=1)
    heads = layer.inher_up.weight.split(4, dim=1)
    manual = sum(g[:, m:m + 1] * (nn.functional.conv2d(h, heads[m]) + layer.inher_bias[m][:, None, None])
                 for m in range(3))
    assert rel_err(layer(x), manual) < 1e-12


@pytest.mark.parametrize("groups", [2, 6])
def test_grouped_and_depthwise_convolutions_are_not_inherited(groups):
    model = nn.Sequential(nn.Conv2d(6, 6, 3, groups=groups))
    with pytest.raises(TypeError, match="nn.Conv2d with groups=1"):
        get_inher_model(model, InherConfig(r=2, target_modules=["0"]), progressbar=False)


def test_calibrated_inits_are_refused_for_convolutions():
    model = _resnet()
    with pytest.raises(ValueError, match="are Conv2d layers.*init='whitened' and rank_allocation='activation' are "
                                         "not supported yet"):
        get_inher_model(model, InherConfig(target_ratio=0.5, init="whitened"), calibration_data=[
            {"pixel_values": PIXELS}], progressbar=False)
    assert not any(isinstance(m, InherLinear) for m in model.modules())


def test_save_load_and_dequantize_are_exact(tmp_path):
    inher = get_inher_model(_resnet(), InherConfig(target_ratio=0.5, num_heads=2), progressbar=False)
    with torch.no_grad():
        for layer in (m for m in inher.modules() if isinstance(m, InherConv2d)):
            for param in layer.parameters():
                param.add_(0.01 * torch.randn_like(param))
        logits = inher(pixel_values=PIXELS).logits
    inher.save_pretrained(tmp_path / "inher")
    loaded = T.AutoModelForImageClassification.from_pretrained(tmp_path / "inher", dtype=torch.float64).eval()
    assert isinstance(loaded.resnet.encoder.stages[1].layers[0].shortcut.convolution, InherConv2d)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=PIXELS).logits, logits)

    one_head = get_inher_model(_resnet(), InherConfig(target_ratio=0.5, num_heads=1), progressbar=False)
    with torch.no_grad():
        for layer in (m for m in one_head.modules() if isinstance(m, InherConv2d)):
            layer.inher_up.weight.add_(0.01 * torch.randn_like(layer.inher_up.weight))
        expected = one_head(pixel_values=PIXELS).logits
        dense = one_head.dequantize()
        assert not any(isinstance(m, InherLinear) for m in dense.modules())
        assert rel_err(dense(pixel_values=PIXELS).logits, expected) < 1e-12
