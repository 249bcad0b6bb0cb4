"""HybridEncoder on its own: parity with the reference D-FINE-N encoder fed the reference's own backbone
outputs (so a backbone difference cannot hide or cause an encoder difference), deploy fusion, and training at
an input size other than ``eval_spatial_size``. Backbone-chained checks live in tests/test_backbone_encoder.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from dfine.layers.conv import RepVGGBlock
from dfine.models.hybrid_encoder import HybridEncoder
from helpers import N_ENCODER, reference


def reference_encoder(eval_spatial_size) -> HybridEncoder:
    ckpt = reference("dfine_n_perturbed.pth")
    state = ckpt["ema"]["module"] if "ema" in ckpt else ckpt["model"]
    encoder = HybridEncoder(**N_ENCODER, eval_spatial_size=eval_spatial_size)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    return encoder


@pytest.fixture(scope="module")
def ref320():
    return reference("eval_n_perturbed.pt")["320"]


def max_abs_diff(ours, theirs) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


def test_encoder_reproduces_reference_from_reference_backbone_outputs(ref320):
    encoder = reference_encoder([320, 320]).eval()
    with torch.no_grad():
        outs = encoder(ref320["backbone_outputs"])
    assert [o.shape for o in outs] == [t.shape for t in ref320["encoder_outputs"]]
    assert max_abs_diff(outs, ref320["encoder_outputs"]) < 1e-4  # seen: 8.9e-6 (deployed: 1.0e-5)

    # the embedding cached for 320 and one computed on the fly give the same outputs
    uncached = copy.deepcopy(encoder)
    uncached.eval_spatial_size = None
    with torch.no_grad():
        assert max_abs_diff(uncached(ref320["backbone_outputs"]), outs) < 1e-6


def test_deploy_fusion_keeps_reference_outputs(ref320):
    encoder = reference_encoder([320, 320]).eval()
    deployed = copy.deepcopy(encoder).convert_to_deploy()
    repvgg = [m for m in deployed.modules() if isinstance(m, RepVGGBlock)]
    assert len(repvgg) == 8 and all(m.deployed for m in repvgg)  # 2 fpn + 2 pan blocks x 2 CSP layers x 1 block
    # only the input projections keep a BatchNorm, as in the reference's deploy model
    assert [n for n, m in deployed.named_modules() if isinstance(m, nn.BatchNorm2d)] == [
        "input_proj.0.norm", "input_proj.1.norm"]
    with torch.no_grad():
        fused = deployed(ref320["backbone_outputs"])
        unfused = encoder(ref320["backbone_outputs"])
    assert max_abs_diff(fused, unfused) < 1e-4
    assert max_abs_diff(fused, ref320["encoder_outputs"]) < 1e-4


def test_trains_at_a_size_other_than_eval_spatial_size():
    """A 256 x 192 (H x W) input on an encoder built for 320 x 320: shapes follow the input, every parameter
    receives a finite gradient, and BatchNorm statistics move in train mode."""
    torch.manual_seed(0)
    encoder = HybridEncoder(**N_ENCODER, eval_spatial_size=[320, 320]).train()
    feats = [torch.randn(2, 512, 16, 12, requires_grad=True), torch.randn(2, 1024, 8, 6, requires_grad=True)]
    before = encoder.input_proj[0].norm.running_mean.clone()
    outs = encoder(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 128, 16, 12), (2, 128, 8, 6)]
    sum((o ** 2).mean() for o in outs).backward()
    no_grad = [n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad[:5]
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    assert not torch.equal(encoder.input_proj[0].norm.running_mean, before)
    # the embedding cached for 320 (10 x 10 tokens) is kept for eval, not replaced by the 8 x 6 one
    assert encoder.pos_embed1.shape == (1, 100, 128)
