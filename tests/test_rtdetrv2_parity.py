"""RT-DETRv2 against the reference implementation (lyuwenyu/RT-DETR, rtdetrv2_pytorch) on ../shared/reference/rtdetrv2.

Every depth with data in that folder is checked (``rtdetrv2_{depth}_perturbed.pth`` with ``eval_{depth}.pt``,
``train_outputs_{depth}_train640.pt``, ...; today r18). The model is built from
configs/rtdetrv2_{depth}vd_coco.yml with the framework's shared parts (PResNet, HybridEncoder in its RT-DETR
version, RTDETRTransformerv2 on the shared deformable attention and denoising, DFINECriterion configured as
RT-DETRv2's objective, DFINEPostProcessor) and loaded from the reference release layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import dfine
from helpers import PIXEL_BOX_TOL, align_queries, assert_same_noised_boxes

# DFINE_REFERENCE_DIR points the checks at another folder laid out like ../shared/reference (its rtdetrv2/).
REFERENCE = Path(os.environ.get("DFINE_REFERENCE_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "reference"))
RTDETRV2 = REFERENCE / "rtdetrv2"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

DEPTHS = sorted(p.name.split("_")[1] for p in RTDETRV2.glob("rtdetrv2_r*_perturbed.pth")) if RTDETRV2.is_dir() else []


def load(name: str):
    if not (RTDETRV2 / name).is_file():
        pytest.skip(f"{name} not in {RTDETRV2}")
    return torch.load(RTDETRV2 / name, weights_only=True)


@pytest.fixture(scope="module", params=DEPTHS)
def depth(request) -> str:
    return request.param


def weights(depth: str) -> Path:
    return RTDETRV2 / f"rtdetrv2_{depth}_perturbed.pth"


@pytest.fixture(scope="module")
def cfg(depth):
    return dfine.load_config(CONFIGS / f"rtdetrv2_{depth}vd_coco.yml")


@pytest.fixture(scope="module")
def inputs():
    return torch.load(REFERENCE / "inputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(cfg, depth):
    model = dfine.build_model(cfg, load_pretrained=False)
    report = dfine.load_checkpoint(model, weights(depth))
    assert report.ok and report.source.endswith("[ema.module]")
    return model


@pytest.fixture(scope="module")
def eval_outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(inputs["images_640_u8"].float() / 255.0)


@pytest.mark.skipif(not (RTDETRV2 / "param_counts.json").is_file(), reason=f"no param_counts.json in {RTDETRV2}")
@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_counts_equal_reference(depth):
    expected = json.loads((RTDETRV2 / "param_counts.json").read_text())[f"r{depth}"]
    model = dfine.build_model(dfine.load_config(CONFIGS / f"rtdetrv2_r{depth}vd_coco.yml"), load_pretrained=False)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected["trainable_parameters"]
    assert len(state) == expected["state_dict_entries"]
    assert sum(v.numel() for v in state.values()) == expected["state_dict_numel"]


def test_state_dict_keys_and_shapes_equal_reference(model, depth):
    listing = RTDETRV2 / f"state_dict_keys_{depth}.json"
    if not listing.is_file():
        pytest.skip(f"{listing.name} not present")
    expected = {key: (tuple(shape), dtype) for key, shape, dtype in json.loads(listing.read_text())}
    ours = {key: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for key, v in model.state_dict().items()}
    assert ours == expected


def test_eval_logits_and_boxes_match_reference(eval_outputs, depth):
    ref = load(f"eval_{depth}.pt")
    ours_ind, ref_ind = eval_outputs["enc_topk_ind"], ref["enc_topk_ind"]
    logits = align_queries(eval_outputs["pred_logits"], ours_ind, ref_ind)
    boxes = align_queries(eval_outputs["pred_boxes"], ours_ind, ref_ind)
    assert (logits - ref["pred_logits"]).abs().max() < 1e-3
    assert (boxes - ref["pred_boxes"]).abs().max() < 1e-4


def test_postprocessor_matches_reference_on_reference_outputs(cfg, inputs, depth):
    ref = load(f"eval_{depth}.pt")
    post = dfine.build_postprocessor(cfg)
    detections = post({"pred_logits": ref["pred_logits"], "pred_boxes": ref["pred_boxes"]}, inputs["orig_target_sizes_640"])
    for ours, theirs in zip(detections, ref["postprocessed"]):
        assert torch.equal(ours["labels"], theirs["labels"])  # COCO category ids
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], **PIXEL_BOX_TOL)
        assert torch.allclose(ours["scores"], theirs["scores"], atol=1e-4, rtol=0)


def test_postprocessed_model_detections_match_reference(cfg, eval_outputs, inputs, depth):
    """End to end: our model's own outputs through our postprocessor give the reference detections (as sets:
    the order of near-equal scores may differ)."""
    ref = load(f"eval_{depth}.pt")
    detections = dfine.build_postprocessor(cfg)(eval_outputs, inputs["orig_target_sizes_640"])
    for ours, theirs in zip(detections, ref["postprocessed"]):
        assert torch.allclose(ours["scores"], theirs["scores"], atol=1e-4, rtol=0)  # sorted descending in both
        key_ours = sorted(zip(ours["labels"].tolist(), ours["boxes"].round(decimals=1).tolist()))
        key_ref = sorted(zip(theirs["labels"].tolist(), theirs["boxes"].round(decimals=1).tolist()))
        assert sum(a[0] == b[0] for a, b in zip(key_ours, key_ref)) >= 0.98 * len(key_ref)


def test_deployed_model_matches_reference_deploy_outputs(cfg, inputs, depth):
    ref = load(f"eval_{depth}.pt")
    model = dfine.build_model(cfg, load_pretrained=False)
    dfine.load_checkpoint(model, weights(depth))
    model.deploy()
    with torch.no_grad():
        out = model(inputs["images_640_u8"].float() / 255.0)
    logits = align_queries(out["pred_logits"], out["enc_topk_ind"], ref["deploy_enc_topk_ind"])
    boxes = align_queries(out["pred_boxes"], out["enc_topk_ind"], ref["deploy_enc_topk_ind"])
    assert (logits - ref["deploy_pred_logits"]).abs().max() < 1e-3
    assert (boxes - ref["deploy_pred_boxes"]).abs().max() < 1e-4


def test_criterion_matches_reference_loss_dict(cfg, inputs, depth):
    outputs = load(f"train_outputs_{depth}_train640.pt")
    expected = load(f"train_ref_{depth}_train640.pt")["loss_dict"]
    losses = dfine.build_criterion(cfg)(outputs, inputs["targets_640"])
    assert sorted(losses) == sorted(expected)
    for key, value in expected.items():
        # relative bound (atol=0 only so that rtol alone decides): the reference's own spread is 1.3e-6
        assert torch.allclose(losses[key], value, rtol=1e-5, atol=0), key


def test_train_forward_backward_matches_reference(cfg, inputs, depth):
    """A train-mode forward with the reference's seeded denoising group reproduces its outputs dict, BatchNorm
    statistics, losses and gradient norm."""
    ref = load(f"train_ref_{depth}_train640.pt")
    ref_outputs = load(f"train_outputs_{depth}_train640.pt")
    model = dfine.build_model(cfg, load_pretrained=False)
    dfine.load_checkpoint(model, weights(depth))
    targets = inputs["targets_640"]
    model.train()

    torch.manual_seed(ref["dn_seed"])
    group = model.decoder.make_denoising_group(targets)
    captured = ref["dn_capture"]
    assert torch.equal(group.content, captured["input_query_logits"])
    assert_same_noised_boxes(group.boxes_unact, captured["input_query_bbox_unact"])
    assert torch.equal(group.attn_mask, captured["attn_mask"])

    images = inputs["images_640_u8"].float() / 255.0
    outputs = model.decoder(model.encoder(model.backbone(images)), targets, denoising=group)
    ind, ref_ind = outputs["enc_topk_ind"], ref["enc_topk_ind"]
    for ours, theirs in [(outputs, ref_outputs), *zip(outputs["aux_outputs"], ref_outputs["aux_outputs"]),
                         (outputs["enc_aux_outputs"][0], ref_outputs["enc_aux_outputs"][0])]:
        assert (align_queries(ours["pred_logits"], ind, ref_ind) - theirs["pred_logits"]).abs().max() < 1e-3
        assert (align_queries(ours["pred_boxes"], ind, ref_ind) - theirs["pred_boxes"]).abs().max() < 1e-4
    for ours, theirs in zip(outputs["dn_aux_outputs"], ref_outputs["dn_aux_outputs"], strict=True):
        assert (ours["pred_logits"] - theirs["pred_logits"]).abs().max() < 1e-3
        assert (ours["pred_boxes"] - theirs["pred_boxes"]).abs().max() < 1e-4

    modules = dict(model.named_modules())
    for name, buffers in ref["bn_buffers_after_forward"].items():
        for key, value in buffers.items():
            ours = getattr(modules[name], key)
            assert torch.allclose(ours.to(value.dtype), value, rtol=1e-4, atol=1e-5), f"{name}.{key}"

    losses = dfine.build_criterion(cfg)(outputs, targets)
    total = sum(losses.values())
    assert torch.allclose(total, ref["loss_total"], rtol=1e-4)
    total.backward()
    # grad_stats holds (norm, sum, max |g|) per parameter; every gradient path must match, e.g. the one-layer
    # look-back of the box refinement shows only in the box head gradients of earlier layers.
    for name, param in model.named_parameters():
        expected_norm = float(ref["grad_stats"][name][0])
        if expected_norm > 1e-3:
            assert param.grad is not None, name
            assert abs(param.grad.double().norm().item() - expected_norm) <= 1e-3 * expected_norm, name
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), ref["clip_max_norm"])
    assert torch.allclose(grad_norm, ref["grad_total_norm_before_clip"], rtol=1e-4)
