"""HGNetV2 backbone and HybridEncoder: parity with the reference D-FINE-N, every variant, freezing, pretrained
loading, the position embedding and deploy fusion."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

from dfine.layers.conv import ConvNormAct, RepVGGBlock, convert_to_deploy
from dfine.layers.position_embedding import sine_cosine_2d
from dfine.models.backbones import hgnetv2 as hgnetv2_module
from dfine.models.backbones.hgnetv2 import ARCHS, HGNetV2, PretrainedWeightsError
from dfine.models.hybrid_encoder import HybridEncoder
from dfine.registry import BACKBONES, ENCODERS
from helpers import N_ENCODER, REFERENCE_DIR, reference


# the reference configs/dfine/dfine_hgnetv2_n_coco.yml
N_BACKBONE = dict(name="B0", use_lab=True, return_idx=[2, 3], freeze_at=-1, freeze_norm=False, pretrained=False)


def reference_weights(prefix: str) -> dict[str, torch.Tensor]:
    state = reference("dfine_n_perturbed.pth")["ema"]["module"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def n_model(eval_spatial_size, **backbone_overrides):
    backbone = HGNetV2(**{**N_BACKBONE, **backbone_overrides})
    encoder = HybridEncoder(**N_ENCODER, eval_spatial_size=eval_spatial_size)
    backbone.load_state_dict(reference_weights("backbone."))
    encoder.load_state_dict(reference_weights("encoder."))
    return backbone, encoder


def images(size: int) -> torch.Tensor:
    return reference("inputs.pt")[f"images_{size}_u8"].float() / 255.0


# -- parity with the reference D-FINE-N -----------------------------------------------------------------------


def test_state_dict_equals_reference_keys_shapes_and_order():
    path = REFERENCE_DIR / "state_dict_keys_n.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    expected = [tuple(e) for e in json.loads(path.read_text()) if e[0].startswith(("backbone.", "encoder."))]
    backbone, encoder = HGNetV2(**N_BACKBONE), HybridEncoder(**N_ENCODER, eval_spatial_size=[640, 640])
    ours = [(f"{prefix}.{k}", list(v.shape), str(v.dtype).removeprefix("torch."))
            for prefix, module in (("backbone", backbone), ("encoder", encoder)) for k, v in module.state_dict().items()]
    assert [tuple(e) for e in ours] == expected


def test_n_outputs_equal_reference_at_320_and_after_deploy():
    ref = reference("eval_n_perturbed.pt")["320"]
    backbone, encoder = n_model([320, 320])
    backbone.eval(), encoder.eval()
    with torch.no_grad():
        feats = backbone(images(320))
        outs = encoder(feats)
    assert len(feats) == len(ref["backbone_outputs"]) == 2
    for ours, theirs in zip(feats, ref["backbone_outputs"]):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)  # seen: 1.1e-5
    for ours, theirs in zip(outs, ref["encoder_outputs"]):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)  # seen: 2.1e-5

    deployed = copy.deepcopy(encoder).convert_to_deploy()
    assert not any(isinstance(m, nn.BatchNorm2d) for name, m in deployed.named_modules() if "input_proj" not in name)
    with torch.no_grad():
        fused = deployed(feats)
    for ours, unfused, theirs in zip(fused, outs, ref["encoder_outputs"]):
        torch.testing.assert_close(ours, unfused, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def fingerprint_matches(ours: torch.Tensor, theirs: dict) -> None:
    assert list(ours.shape) == list(theirs["shape"])
    torch.testing.assert_close(ours.mean((0, 2, 3)), theirs["channel_mean"], atol=1e-4, rtol=0)
    assert abs(ours.max().item() - theirs["max"]) < 1e-3 and abs(ours.std().item() - theirs["std"]) < 1e-4


def test_n_fingerprints_at_640_in_eval_and_train_mode():
    """Eval mode uses the embedding cached for 640; train mode normalises with batch statistics."""
    backbone, encoder = n_model([640, 640])
    x = images(640)
    with torch.no_grad():
        backbone.eval(), encoder.eval()
        feats = backbone(x)
        outs = encoder(feats)
        ref = reference("eval_n_perturbed.pt")["640"]["fingerprints"]
        for ours, theirs in zip(feats, ref["backbone"]):
            fingerprint_matches(ours, theirs)
        for ours, theirs in zip(outs, ref["encoder"]):
            fingerprint_matches(ours, theirs)
        backbone.train(), encoder.train()
        train_outs = encoder(backbone(x))
    for ours, theirs in zip(train_outs, reference("train_ref_n_perturbed_train640.pt")["encoder_fingerprints"]):
        fingerprint_matches(ours, theirs)


def test_frozen_norm_backbone_loads_reference_weights_and_matches_eval_mode():
    """FrozenBatchNorm2d accepts BatchNorm checkpoints and computes eval-mode BatchNorm, in train mode too."""
    ref = reference("eval_n_perturbed.pt")["320"]["backbone_outputs"]
    backbone, _ = n_model([320, 320], freeze_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    backbone.train()
    with torch.no_grad():
        feats = backbone(images(320))
    for ours, theirs in zip(feats, ref):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# -- every variant, freezing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_variant_runs_forward_and_backward(name):
    torch.manual_seed(0)
    use_lab = name in ("B0", "B2")  # N/S/M use LAB, L/X do not
    backbone = BACKBONES.build({"type": "HGNetV2", "name": name, "use_lab": use_lab, "return_idx": [0, 1, 2, 3],
                                "freeze_at": -1, "freeze_norm": False, "pretrained": False}, "model.backbone")
    feats = backbone(torch.rand(2, 3, 64, 96))
    assert [f.shape[1] for f in feats] == [s[2] for s in ARCHS[name]["stages"]] == backbone.out_channels
    assert [tuple(f.shape[2:]) for f in feats] == [(64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert backbone.out_strides == [4, 8, 16, 32]
    sum(f.mean() for f in feats).backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]
    assert any(isinstance(m, hgnetv2_module.LearnableAffineBlock) for m in backbone.modules()) == use_lab


def frozen_parts(backbone: HGNetV2) -> list[str]:
    parts = ["stem"] + [f"stages.{i}" for i in range(4)]
    return [part for part in parts if not any(p.requires_grad for p in backbone.get_submodule(part).parameters())]


@pytest.mark.parametrize(("freeze_at", "stem_only", "expected"), [
    (-1, True, []),
    (-1, False, []),
    (0, True, ["stem"]),
    (0, False, ["stem", "stages.0"]),
    (2, False, ["stem", "stages.0", "stages.1", "stages.2"]),
])
def test_freeze_at(freeze_at, stem_only, expected):
    backbone = HGNetV2("B0", freeze_at=freeze_at, freeze_stem_only=stem_only, freeze_norm=False, pretrained=False)
    assert frozen_parts(backbone) == expected


def test_frozen_parameters_and_norms_do_not_change_in_training():
    torch.manual_seed(0)
    backbone = HGNetV2("B0", use_lab=True, freeze_at=0, freeze_stem_only=False, freeze_norm=True, pretrained=False)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    before = copy.deepcopy(backbone.state_dict())
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    backbone.train()
    for _ in range(2):
        optimizer.zero_grad()
        sum(f.square().mean() for f in backbone(torch.rand(2, 3, 64, 64))).backward()
        optimizer.step()
    after = backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = [k for k in before if k.startswith(("stem.", "stages.0.")) or ".bn." in k]
    assert frozen and not changed.intersection(frozen)
    assert any(k.startswith("stages.3.") for k in changed)  # the rest does train


# -- pretrained weights --------------------------------------------------------------------------------------


def test_pretrained_false_never_touches_files_or_network(monkeypatch, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("nothing may be read or downloaded when pretrained=False")

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    HGNetV2("B0", pretrained=False, local_model_dir=str(tmp_path / "does" / "not" / "exist"))


def test_pretrained_unreachable_gives_an_actionable_error(monkeypatch, tmp_path):
    import dataclasses

    import dfine.weights as weights

    url = "http://127.0.0.1:9/PPHGNetV2_B2_stage1.pth"  # port 9 (discard): nothing answers
    monkeypatch.setitem(weights.WEIGHTS, "hgnetv2_b2", dataclasses.replace(weights.WEIGHTS["hgnetv2_b2"], url=url))
    monkeypatch.setenv("DFINE_HOME", str(tmp_path / "home"))
    with pytest.raises(PretrainedWeightsError) as info:
        HGNetV2("B2", pretrained=True, local_model_dir=str(tmp_path))
    message = str(info.value)
    assert f"put it at {tmp_path / 'home' / 'weights' / 'PPHGNetV2_B2_stage1.pth'}" in message and url in message
    assert "pretrained: false" in message and "load_pretrained=False" in message


def test_pretrained_loads_from_local_dir_file_or_download(monkeypatch, tmp_path):
    import dataclasses

    import dfine.weights as weights

    torch.manual_seed(0)
    source = HGNetV2("B0", use_lab=True, freeze_norm=False, pretrained=False)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    state = source.state_dict()
    saved = tmp_path / "PPHGNetV2_B0_stage1.pth"
    torch.save(state, saved)

    def same_weights(model):
        return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    assert same_weights(HGNetV2("B0", use_lab=True, freeze_norm=False, local_model_dir=str(tmp_path)))
    assert same_weights(HGNetV2("B0", use_lab=True, freeze_norm=False, local_model_dir=str(saved)))

    # not in local_model_dir: fetched through the weights cache (dfine/weights.py), here from a file:// URL
    entry = dataclasses.replace(weights.WEIGHTS["hgnetv2_b0"], url=saved.as_uri())
    monkeypatch.setitem(weights.WEIGHTS, "hgnetv2_b0", entry)
    monkeypatch.setenv("DFINE_HOME", str(tmp_path / "home"))
    assert same_weights(HGNetV2("B0", use_lab=True, freeze_norm=False, local_model_dir=str(tmp_path / "fresh")))
    assert (tmp_path / "home" / "weights" / saved.name).is_file()

    # weights of another variant do not fit: the error names the file and how to opt out
    with pytest.raises(PretrainedWeightsError, match="PPHGNetV2_B0_stage1.pth"):
        HGNetV2("B1", use_lab=True, freeze_norm=False, local_model_dir=str(saved))


# -- position embedding and encoder ---------------------------------------------------------------------------


def test_sine_cosine_embedding_by_hand():
    emb = sine_cosine_2d(width=2, height=3, embed_dim=4)  # one frequency per block: 1.0
    assert emb.shape == (1, 6, 4)
    for token in range(6):
        a, b = float(token // 3), float(token % 3)
        expected = torch.tensor([a, a, b, b])
        expected = torch.stack([expected[0].sin(), expected[1].cos(), expected[2].sin(), expected[3].cos()])
        torch.testing.assert_close(emb[0, token], expected)
    emb8 = sine_cosine_2d(width=1, height=2, embed_dim=8, temperature=100.0)  # frequencies 1 and 1/10
    expected8 = [0.0, 0.0, 1.0, 1.0, math.sin(1.0), math.sin(0.1), math.cos(1.0), math.cos(0.1)]  # a = 0, b = 1
    torch.testing.assert_close(emb8[0, 1], torch.tensor(expected8))
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_cosine_2d(2, 2, embed_dim=6)


def test_encoder_recomputes_the_embedding_for_another_size():
    torch.manual_seed(0)
    built_for_320 = HybridEncoder(**N_ENCODER, eval_spatial_size=[320, 320]).eval()
    no_cache = copy.deepcopy(built_for_320)
    no_cache.eval_spatial_size = None
    feats = [torch.rand(1, 512, 12, 16), torch.rand(1, 1024, 6, 8)]  # a 192x256 input
    with torch.no_grad():
        for ours, plain in zip(built_for_320(feats), no_cache(feats)):
            torch.testing.assert_close(ours, plain)
    assert built_for_320.pos_embed1.shape == (1, 100, 128)
    assert "pos_embed1" not in built_for_320.state_dict()  # not persistent, as in the reference


def randomise_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("version", ["dfine", "rtdetr"])
def test_encoder_versions_train_and_fuse(version):
    torch.manual_seed(0)
    encoder = ENCODERS.build({"type": "HybridEncoder", "in_channels": [32, 64, 96], "hidden_dim": 32, "nhead": 4,
                              "dim_feedforward": 64, "expansion": 0.5, "depth_mult": 0.34, "version": version,
                              "eval_spatial_size": [128, 128]}, "model.encoder")
    feats = [torch.rand(2, 32, 16, 16), torch.rand(2, 64, 8, 8), torch.rand(2, 96, 4, 4)]
    outs = encoder(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    sum(o.mean() for o in outs).backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None]
    assert not missing, missing[:5]

    randomise_batchnorm(encoder)
    encoder.eval()
    with torch.no_grad():
        expected = encoder(feats)
        fused = convert_to_deploy(copy.deepcopy(encoder))
        assert any(isinstance(m, RepVGGBlock) and m.deployed for m in fused.modules())
        for ours, theirs in zip(fused(feats), expected):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_rtdetr_version_has_the_rtdetrv2_reference_layout():
    path = REFERENCE_DIR / "rtdetrv2" / "state_dict_keys_r18.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    expected = [(k[len("encoder."):], s) for k, s, _ in json.loads(path.read_text()) if k.startswith("encoder.")]
    # the reference rtdetrv2_r18vd_120e_coco.yml encoder
    encoder = HybridEncoder(in_channels=[128, 256, 512], hidden_dim=256, expansion=0.5, depth_mult=1.0, version="rtdetr")
    assert [(k, list(v.shape)) for k, v in encoder.state_dict().items()] == expected


def test_conv_norm_act_fold_is_exact_for_strided_grouped_convs():
    torch.manual_seed(0)
    block = ConvNormAct(8, 8, 3, stride=2, groups=8, act="silu")
    randomise_batchnorm(block)
    block.eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = block(x)
        block.convert_to_deploy()
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)
    assert set(block.state_dict()) == {"conv_bn_fused.weight", "conv_bn_fused.bias"}


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="unknown HGNetV2 variant `B9`"):
        HGNetV2("B9", pretrained=False)
    with pytest.raises(ValueError, match="return_idx"):
        HGNetV2("B0", return_idx=[4], pretrained=False)
    with pytest.raises(ValueError, match="version"):
        HybridEncoder(version="v3")
    with pytest.raises(ValueError, match="use_encoder_idx"):
        HybridEncoder(in_channels=[8, 16], feat_strides=[16, 32], use_encoder_idx=[2])
    encoder = HybridEncoder(in_channels=[8, 16], feat_strides=[16, 32], hidden_dim=16, nhead=2, use_encoder_idx=[1])
    with pytest.raises(ValueError, match="expects 2 feature maps, got 1"):
        encoder([torch.rand(1, 8, 4, 4)])
