"""PResNet and the RT-DETRv2 decoder as components: structure, freezing, pretrained loading, small forward and
backward passes in every mode. Parity with the reference lives in test_rtdetrv2_parity.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

import dfine
from dfine.losses.criterion import DFINECriterion
from dfine.losses.matcher import HungarianMatcher
from dfine.models.backbones.hgnetv2 import PretrainedWeightsError
from dfine.models.backbones.presnet import PResNet
from dfine.models.rtdetrv2_decoder import RTDETRTransformerv2

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("depth, channels", [(18, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])])
def test_presnet_shapes_and_strides(depth, channels):
    torch.manual_seed(0)
    model = PResNet(depth, return_idx=[0, 1, 2, 3], freeze_norm=False).eval()
    outs = model(torch.rand(1, 3, 64, 96))
    assert model.out_channels == channels and model.out_strides == [4, 8, 16, 32]
    assert [tuple(o.shape) for o in outs] == [(1, c, 64 // s, 96 // s) for c, s in zip(channels, [4, 8, 16, 32])]


def test_presnet_variant_d_pools_before_its_downsampling_shortcut():
    d = PResNet(18, variant="d", freeze_norm=False)
    b = PResNet(18, variant="b", freeze_norm=False)
    assert isinstance(d.res_layers[1].blocks[0].short.pool, nn.AvgPool2d)
    assert d.res_layers[1].blocks[0].short.conv.conv.stride == (1, 1)
    assert b.res_layers[1].blocks[0].short.conv.stride == (2, 2)
    assert len(d.conv1) == 3 and len(b.conv1) == 1 and b.conv1.conv1_1.conv.kernel_size == (7, 7)
    # variant 'a' strides the first 1x1 conv of a bottleneck, the others the 3x3 conv
    a50, d50 = PResNet(50, variant="a", freeze_norm=False), PResNet(50, variant="d", freeze_norm=False)
    assert a50.res_layers[1].blocks[0].branch2a.conv.stride == (2, 2)
    assert d50.res_layers[1].blocks[0].branch2b.conv.stride == (2, 2)


def test_presnet_freezing():
    model = PResNet(18, freeze_at=2, freeze_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("conv1.", "res_layers.0.", "res_layers.1."))}
    assert PResNet(18, freeze_at=-1, freeze_norm=False).conv1.conv1_1.conv.weight.requires_grad


def test_presnet_rejects_unknown_depth_and_bad_return_idx():
    with pytest.raises(ValueError, match="depth"):
        PResNet(26)
    with pytest.raises(ValueError, match="return_idx"):
        PResNet(18, num_stages=3, return_idx=[1, 2, 3])


def test_presnet_loads_pretrained_from_local_file(tmp_path):
    torch.manual_seed(1)
    source = PResNet(18, freeze_norm=False)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    loaded = PResNet(18, freeze_norm=True, pretrained=str(path))  # frozen norms take the file's statistics too
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], value), key


def test_presnet_pretrained_errors_are_actionable(tmp_path, monkeypatch):
    with pytest.raises(PretrainedWeightsError, match="pretrained: false"):
        PResNet(18, pretrained=str(tmp_path / "missing.pth"))
    torch.save(PResNet(34, freeze_norm=False).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(PretrainedWeightsError, match="depth 18"):
        PResNet(18, pretrained=str(tmp_path / "r34.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(PretrainedWeightsError, match="download from http://127.0.0.1:9/"):
        PResNet(18, pretrained="http://127.0.0.1:9/ResNet18_vd_unreachable.pth")


def test_build_model_without_pretrained_never_reads_the_weights():
    cfg = dfine.load_config(CONFIGS / "rtdetrv2_r18vd_coco.yml", overrides=["model.backbone.pretrained=/nonexistent/r18.pth"])
    dfine.build_model(cfg, load_pretrained=False)  # would raise if the path were read
    with pytest.raises(PretrainedWeightsError, match="/nonexistent/r18.pth"):
        dfine.build_model(cfg, load_pretrained=True)


@pytest.mark.skipif(not (REFERENCE / "rtdetrv2" / "eval_r18.pt").is_file(), reason="RT-DETRv2 reference data absent")
def test_presnet18_features_match_reference_fingerprints():
    state = torch.load(REFERENCE / "rtdetrv2" / "rtdetrv2_r18_perturbed.pth", weights_only=True)["ema"]["module"]
    backbone = PResNet(18, return_idx=[1, 2, 3], freeze_norm=False)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    images = torch.load(REFERENCE / "inputs.pt", weights_only=True)["images_640_u8"].float() / 255.0
    with torch.no_grad():
        feats = backbone.eval()(images)
    prints = torch.load(REFERENCE / "rtdetrv2" / "eval_r18.pt", weights_only=True)["fingerprints"]["backbone"]
    for feat, fp in zip(feats, prints, strict=True):
        assert list(feat.shape) == list(fp["shape"])
        assert torch.allclose(feat.mean((0, 2, 3)), fp["channel_mean"], atol=1e-4)
        assert abs(feat.max().item() - fp["max"]) < 1e-3 * fp["max"]


# -- the decoder, small -----------------------------------------------------------------------------------


def small_decoder(**overrides) -> RTDETRTransformerv2:
    args = dict(num_classes=5, hidden_dim=32, num_queries=20, feat_channels=[32, 32], feat_strides=[8, 16], num_levels=3,
                num_points=[2, 3, 4], nhead=4, num_layers=3, dim_feedforward=64, num_denoising=10, eval_spatial_size=[64, 64])
    args.update(overrides)
    return RTDETRTransformerv2(**args)


def small_targets():
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


def small_criterion() -> DFINECriterion:
    matcher = HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}, use_focal_loss=True)
    return DFINECriterion(matcher, {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2}, ["vfl", "boxes"], alpha=0.75,
                          num_classes=5, use_union_matching=False)


@pytest.mark.parametrize("cross_attn_method", ["default", "discrete"])
@pytest.mark.parametrize("query_select_method", ["default", "agnostic", "one2many"])
def test_decoder_train_forward_backward(cross_attn_method, query_select_method):
    torch.manual_seed(0)
    decoder = small_decoder(cross_attn_method=cross_attn_method, query_select_method=query_select_method).train()
    feats = [torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)]
    out = decoder(feats, small_targets())
    assert out["pred_logits"].shape == (2, 20, 5) and out["pred_boxes"].shape == (2, 20, 4)
    assert len(out["aux_outputs"]) == 2 and len(out["dn_aux_outputs"]) == 3 and len(out["enc_aux_outputs"]) == 1
    groups = out["dn_meta"]["dn_num_group"]
    assert out["dn_aux_outputs"][0]["pred_boxes"].shape == (2, 2 * 2 * groups, 4)
    assert out["enc_meta"]["class_agnostic"] == (query_select_method == "agnostic")
    losses = small_criterion()(out, small_targets())
    assert {"loss_vfl", "loss_bbox_aux_1", "loss_giou_dn_2", "loss_vfl_enc_0"} <= set(losses)
    sum(losses.values()).backward()
    no_grad = [n for n, p in decoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad
    if cross_attn_method == "discrete":  # rounding to a cell has no gradient: the offsets are frozen
        assert not decoder.decoder.layers[0].cross_attn.sampling_offsets.weight.requires_grad


def test_decoder_eval_returns_the_eval_layer_and_handles_other_sizes():
    torch.manual_seed(0)
    decoder = small_decoder(eval_idx=1).eval()
    with torch.no_grad():
        out = decoder([torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)])
        other = decoder([torch.randn(1, 32, 12, 10), torch.randn(1, 32, 6, 5)])  # anchors made for this size
    assert set(out) == {"pred_logits", "pred_boxes", "enc_topk_ind"}
    assert other["pred_boxes"].shape == (1, 20, 4) and int(other["enc_topk_ind"].max()) < 120 + 30 + 9
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


def test_decoder_first_layer_box_is_the_selected_anchor_box_when_heads_are_zero():
    """With zero-initialised box heads, every layer returns the encoder's box for its query unchanged."""
    torch.manual_seed(0)
    decoder = small_decoder(num_denoising=0).train()
    out = decoder([torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)])
    encoder_boxes = out["enc_aux_outputs"][0]["pred_boxes"]
    for layer in [*out["aux_outputs"], out]:
        assert torch.allclose(layer["pred_boxes"], encoder_boxes, atol=1e-5)


def test_training_batch_without_targets_still_trains_every_parameter():
    torch.manual_seed(0)
    decoder = small_decoder().train()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    out = decoder([torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)], empty)
    losses = small_criterion()(out, empty)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


# -- the RT-DETRv2 variant configs (R50-M, discrete sampling, sampling points, VOC) ---------------------------
# Each builds its parent config's model (the config it includes) with a few settings changed; its parameter count
# must differ from the parent's by what those settings add or remove, counted by hand. The four depth configs
# themselves are checked against the reference's counts in test_rtdetrv2_parity.py, and the decoder options run
# forward and backward above. Models are built on the meta device: every constructor runs with the config's
# arguments and every shape is made, without allocating or initialising weights (~7x faster on a CPU).
VARIANTS = sorted(p.name for p in CONFIGS.glob("rtdetrv2_*.yml")
                  if p.name not in {f"rtdetrv2_r{d}vd_coco.yml" for d in (18, 34, 50, 101)} and "_demo" not in p.name)
VARIANT_KEYS = {"decoder.num_points", "decoder.num_classes", "decoder.cross_attn_method", "decoder.eval_idx",
                "encoder.expansion"}


def _parent(config: str) -> str:
    from dfine.config import safe_load_yaml

    includes = safe_load_yaml((CONFIGS / config).read_text())["__include__"]
    return next(i for i in includes if not i.startswith("base/"))


def _csp_parameters(in_channels: int, out_channels: int, hidden: int, blocks: int) -> int:
    """CSPRepLayer: two 1x1 conv+BN in->hidden, `blocks` RepVGG blocks (3x3 and 1x1 conv, each with BN), and a
    1x1 conv+BN hidden->out unless hidden == out (then the identity). BN: weight and bias per channel."""
    two_inputs = 2 * (in_channels * hidden + 2 * hidden)
    repvgg = blocks * (9 * hidden * hidden + hidden * hidden + 4 * hidden)
    last = 0 if hidden == out_channels else hidden * out_channels + 2 * out_channels
    return two_inputs + repvgg + last


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", VARIANTS)
def test_variant_config_builds_its_parents_model_with_only_its_changes(config):
    parent = _parent(config)
    cfg, parent_cfg = dfine.load_config(CONFIGS / config), dfine.load_config(CONFIGS / parent)
    changed = {f"{part}.{key}" for part in ("backbone", "encoder", "decoder")
               for key in set(cfg["model"][part]) | set(parent_cfg["model"][part])
               if cfg["model"][part].get(key) != parent_cfg["model"][part].get(key)}
    assert changed <= VARIANT_KEYS, f"{config} changes {sorted(changed - VARIANT_KEYS)} of {parent}: count them here"
    with torch.device("meta"):
        model = dfine.build_model(cfg, load_pretrained=False)
        parent_model = dfine.build_model(parent_cfg, load_pretrained=False)
    dec, enc = cfg["model"]["decoder"], cfg["model"]["encoder"]
    parent_dec, parent_enc = parent_cfg["model"]["decoder"], parent_cfg["model"]["encoder"]
    hidden, heads, layers = dec["hidden_dim"], 8, dec["num_layers"]
    expected = _count(parent_model)
    # sampling offsets (2 per point) and attention weights (1 per point) of every head, in each decoder layer
    expected += layers * (hidden + 1) * heads * 3 * (sum(dec["num_points"]) - sum(parent_dec["num_points"]))
    # one row per class in the encoder's and every layer's score head, and in the denoising class embedding
    expected += ((1 + layers) * (hidden + 1) + hidden) * (dec["num_classes"] - parent_dec["num_classes"])
    # the 2 top-down and 2 bottom-up fusion blocks (3 RepVGG blocks at depth_mult 1) with their hidden width
    if enc["expansion"] != parent_enc["expansion"]:
        width = enc["hidden_dim"]
        expected += 4 * (_csp_parameters(2 * width, width, int(width * enc["expansion"]), 3)
                         - _csp_parameters(2 * width, width, int(width * parent_enc["expansion"]), 3))
    assert _count(model) == expected
    methods = {layer.cross_attn.method for layer in model.decoder.decoder.layers}
    assert methods == {dec["cross_attn_method"]}
    assert model.decoder.eval_idx == dec["eval_idx"] % layers   # the layer whose output is the prediction
