"""Parity of the D-FINE-N model with the reference implementation (data in ../shared/reference).

Queries are compared after aligning them by the anchor each was selected from (``enc_topk_ind``): the decoder
does not depend on query order, and near-equal encoder scores may swap places between implementations.
"""

from __future__ import annotations

import json

import pytest
import torch

from dfine.models.denoising import DenoisingGroup, contrastive_denoising_group
from dfine.models.dfine_decoder import DFINETransformer
from dfine.registry import BACKBONES, ENCODERS
from helpers import align_queries, assert_close_by_anchor, assert_same_noised_boxes

N_DECODER = dict(
    num_classes=80, hidden_dim=128, feat_channels=[128, 128], feat_strides=[16, 32], num_levels=2, num_layers=3,
    dim_feedforward=512, num_points=[6, 6], reg_max=32, reg_scale=4,
)
# Bounds against the reference: its own 1-vs-2-thread spread is 3e-4 in logits and 6e-6 in boxes
# (../shared/reference/README.md). Ours at 640 on an AMD EPYC: 1.4e-5 / 3.6e-7 with 1 thread, 4.2e-5 / 1.5e-6 with
# 2; on images nudged by one ulp 2.9e-4 / 8.8e-6, still under half of each bound (tests/test_tolerance_headroom.py).
LOGITS_TOL, BOXES_TOL = 1e-3, 1e-4

needs_full_model = pytest.mark.skipif(
    "HGNetV2" not in BACKBONES or "HybridEncoder" not in ENCODERS,
    reason="HGNetV2 / HybridEncoder are not registered yet (dfine/models/backbones, dfine/models/hybrid_encoder.py)",
)


def load_ref(reference_dir, name):
    return torch.load(reference_dir / name, weights_only=True)


def reference_weights(reference_dir) -> dict:
    return load_ref(reference_dir, "dfine_n_perturbed.pth")["ema"]["module"]


def assert_eval_parity(out: dict, ref: dict, prefix: str = "") -> None:
    ind = ref[f"{prefix}enc_topk_ind"]
    logits = align_queries(out["pred_logits"], out["enc_topk_ind"], ind)
    boxes = align_queries(out["pred_boxes"], out["enc_topk_ind"], ind)
    torch.testing.assert_close(logits, ref[f"{prefix}pred_logits"], atol=LOGITS_TOL, rtol=0)
    torch.testing.assert_close(boxes, ref[f"{prefix}pred_boxes"], atol=BOXES_TOL, rtol=0)


def test_decoder_on_reference_encoder_outputs_320(reference_dir):
    """The decoder alone, fed the reference's exact encoder outputs (no backbone involved)."""
    ref = load_ref(reference_dir, "eval_n_perturbed.pt")["320"]
    decoder = DFINETransformer(**N_DECODER, eval_spatial_size=[320, 320]).eval()
    state = {k[len("decoder."):]: v for k, v in reference_weights(reference_dir).items() if k.startswith("decoder.")}
    # Anchors of the checkpoint belong to its 640 build; the 320 build makes its own.
    assert state["anchors"].shape[1] == 2000 and decoder.anchors.shape[1] == 500
    state = {k: v for k, v in state.items() if k not in ("anchors", "valid_mask")}
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    assert sorted(missing) == ["anchors", "valid_mask"] and not unexpected
    with torch.no_grad():
        out = decoder(ref["encoder_outputs"])
    assert_eval_parity(out, ref)


def test_denoising_group_reproduces_reference(reference_dir):
    """Same seed, same random draws: the noised queries, mask and bookkeeping equal the captured group."""
    train_ref = load_ref(reference_dir, "train_ref_n_perturbed_train640.pt")
    captured = train_ref["dn_capture"]
    embed = torch.nn.Embedding(81, 128, padding_idx=80)
    embed.weight.data.copy_(reference_weights(reference_dir)["decoder.denoising_class_embed.weight"])
    targets = load_ref(reference_dir, "inputs.pt")["targets_640"]
    torch.manual_seed(train_ref["dn_seed"])
    group = contrastive_denoising_group(targets, 80, 300, embed, **captured["kwargs"])
    # Exact by construction: the labels come from comparing uniform draws (bit-identical on every CPU) with a
    # threshold, and the content queries are rows of the same embedding picked by those labels.
    assert torch.equal(group.content, captured["input_query_logits"])
    assert torch.equal(group.attn_mask, captured["attn_mask"])  # built from integer counts
    assert_same_noised_boxes(group.boxes_unact, captured["input_query_bbox_unact"])
    assert group.meta["dn_num_group"] == captured["dn_meta"]["dn_num_group"]
    assert group.meta["dn_num_split"] == captured["dn_meta"]["dn_num_split"]
    for ours, theirs in zip(group.meta["dn_positive_idx"], captured["dn_meta"]["dn_positive_idx"]):
        assert torch.equal(ours, theirs)


def test_denoising_without_targets():
    embed = torch.nn.Embedding(4, 8, padding_idx=3)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    group = contrastive_denoising_group(empty, 3, 10, embed)
    # Zero queries, but still drawn through the embedding: under DDP every rank needs the same graph.
    assert group.content.shape == (1, 0, 8) and group.content.grad_fn is not None
    assert group.boxes_unact.shape == (1, 0, 4) and group.attn_mask is None
    assert group.meta["dn_num_split"] == [0, 10] and group.meta["dn_num_group"] == 1
    assert [len(i) for i in group.meta["dn_positive_idx"]] == [0]
    assert contrastive_denoising_group(empty, 3, 10, embed, num_denoising=0) is None


# -- full model (backbone + encoder + decoder) ------------------------------------------------------------


def build_n(eval_size=640):
    import dfine

    cfg = dfine.load_config("configs/dfine_n_coco.yml", overrides=[f"eval_spatial_size=[{eval_size},{eval_size}]"])
    return dfine.build_model(cfg, load_pretrained=False)


@pytest.fixture(scope="module")
def model_n(reference_dir):
    from dfine.checkpoint import load_checkpoint

    model = build_n()
    report = load_checkpoint(model, reference_dir / "dfine_n_perturbed.pth")
    assert report.ok
    return model


def images(reference_dir, size):
    return load_ref(reference_dir, "inputs.pt")[f"images_{size}_u8"].float() / 255.0


@needs_full_model
def test_state_dict_matches_reference_keys(reference_dir):
    expected = json.loads((reference_dir / "state_dict_keys_n.json").read_text())
    ours = build_n().state_dict()
    assert [k for k, _, _ in expected] == list(ours)
    for key, shape, dtype in expected:
        assert list(ours[key].shape) == shape and str(ours[key].dtype).removeprefix("torch.") == dtype, key


@needs_full_model
def test_eval_parity_640(reference_dir, model_n):
    ref = load_ref(reference_dir, "eval_n_perturbed.pt")["640"]
    with torch.no_grad():
        out = model_n.eval()(images(reference_dir, 640))
    assert_eval_parity(out, ref)


@needs_full_model
def test_backbone_and_encoder_outputs_320(reference_dir, model_n):
    ref = load_ref(reference_dir, "eval_n_perturbed.pt")["320"]
    model_n.eval()
    with torch.no_grad():
        feats = model_n.backbone(images(reference_dir, 320))
        fused = model_n.encoder(feats)
    for ours, theirs in zip(feats, ref["backbone_outputs"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(fused, ref["encoder_outputs"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@needs_full_model
def test_eval_parity_320_model_built_for_320(reference_dir):
    from dfine.checkpoint import extract_state_dict, load_state_dict_checked

    ref = load_ref(reference_dir, "eval_n_perturbed.pt")["320"]
    model = build_n(eval_size=320)
    state, _ = extract_state_dict(load_ref(reference_dir, "dfine_n_perturbed.pth"))
    report = load_state_dict_checked(model, state, "dfine_n_perturbed.pth", strict=False)
    # the 640 anchors of the checkpoint are not loaded: the model keeps those of its own 320 build
    assert report.ok and sorted(report.recomputed) == ["decoder.anchors", "decoder.valid_mask"]
    assert model.decoder.anchors.shape[1] == 500
    with torch.no_grad():
        out = model.eval()(images(reference_dir, 320))
    assert_eval_parity(out, ref)


@needs_full_model
def test_deploy_parity_640(reference_dir):
    import copy

    from dfine.checkpoint import load_checkpoint
    from dfine.models.postprocessor import DFINEPostProcessor

    ref = load_ref(reference_dir, "eval_n_perturbed.pt")["640"]
    model = build_n()
    load_checkpoint(model, reference_dir / "dfine_n_perturbed.pth")
    plain = copy.deepcopy(model).eval()
    model.deploy()
    x = images(reference_dir, 640)
    with torch.no_grad():
        out, plain_out = model(x), plain(x)
    assert_eval_parity(out, ref, prefix="deploy_")
    post = DFINEPostProcessor(num_classes=80, num_top_queries=300)
    labels, boxes, scores = post.deploy()(out, ref["orig_target_sizes"])
    expected = ref["deploy_postprocessed"]
    torch.testing.assert_close(scores, expected["scores"], atol=1e-4, rtol=0)
    # Detections in score order; near-equal scores may swap, so compare labels and boxes where the order agrees.
    same = labels == expected["labels"]
    assert same.float().mean() > 0.95
    torch.testing.assert_close(boxes[same], expected["boxes"][same], atol=1e-2, rtol=0)  # pixels
    # Deploy and plain models give the same outputs per anchor. Fusion moves encoder scores by ~1e-7, so queries
    # with near-equal scores may trade places (seen on an Intel Xeon: queries 230 and its neighbour swapped); the
    # boundary gap of this input (2.4e-4) keeps the selected set itself the same.
    assert_close_by_anchor(out, plain_out, atol={"pred_logits": 1e-4, "pred_boxes": 1e-5})


def _compare_tree(ours, theirs, path, ours_ind, ref_ind, num_dn):
    """Compare nested outputs; tensors over matching queries are aligned by enc_topk_ind."""
    if isinstance(theirs, dict):
        for key, value in theirs.items():
            _compare_tree(ours[key], value, f"{path}.{key}", ours_ind, ref_ind, num_dn)
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _compare_tree(a, b, f"{path}[{i}]", ours_ind, ref_ind, num_dn)
    elif isinstance(theirs, torch.Tensor):
        ours = ours.detach()
        if theirs.dim() == 3 and theirs.shape[1] == ref_ind.shape[1]:
            ours = align_queries(ours, ours_ind, ref_ind)
        tol = LOGITS_TOL if theirs.shape[-1] in (80, 132) else BOXES_TOL
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, atol=tol, rtol=0, msg=lambda m: f"{path}: {m}")
    else:
        assert ours == theirs, path


@needs_full_model
def test_train_outputs_with_captured_denoising_group(reference_dir, model_n):
    """Train mode, with the reference's denoising group injected: every output of the dict matches."""
    train_ref = load_ref(reference_dir, "train_ref_n_perturbed_train640.pt")
    expected = load_ref(reference_dir, "train_outputs_n_perturbed_train640.pt")
    captured = train_ref["dn_capture"]
    group = DenoisingGroup(
        captured["input_query_logits"], captured["input_query_bbox_unact"], captured["attn_mask"], captured["dn_meta"]
    )
    model_n.train()
    try:
        feats = model_n.encoder(model_n.backbone(images(reference_dir, 640)))
        out = model_n.decoder(feats, denoising=group)
    finally:
        model_n.eval()
    assert set(expected) <= set(out)
    _compare_tree(out, expected, "outputs", out["enc_topk_ind"], train_ref["enc_topk_ind"], 200)


def test_decoder_parameters_match_reference_keys(reference_dir):
    """Every decoder entry of the reference state dict exists here with its shape and dtype, in order, and the
    aliased FDR constants are one parameter each (as in the reference, whose model counts them once)."""
    expected = [e for e in json.loads((reference_dir / "state_dict_keys_n.json").read_text()) if e[0].startswith("decoder.")]
    decoder = DFINETransformer(**N_DECODER, eval_spatial_size=[640, 640])
    ours = decoder.state_dict()
    assert [k[len("decoder."):] for k, _, _ in expected] == list(ours)
    for key, shape, dtype in expected:
        tensor = ours[key[len("decoder."):]]
        assert list(tensor.shape) == shape and str(tensor.dtype).removeprefix("torch.") == dtype, key
    assert decoder.decoder.up is decoder.up and decoder.decoder.reg_scale is decoder.reg_scale
    buffers = {"anchors", "valid_mask"} | {k for k in ours if k.endswith("num_points_scale")}
    aliases = {"decoder.up", "decoder.reg_scale"}
    expected_count = sum(ours[k].numel() for k in ours if k not in buffers | aliases)
    assert sum(p.numel() for p in decoder.parameters()) == expected_count
