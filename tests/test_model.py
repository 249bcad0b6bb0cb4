"""The D-FINE model: building blocks, decoder options, every size config forward and backward, deploy mode."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dfine.layers.deformable_attention import MSDeformableAttention, split_value_levels
from dfine.layers.mlp import MLP
from dfine.models.dfine_decoder import DFINETransformer
from dfine.models.query_selection import generate_anchors
from helpers import assert_close_by_anchor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = ["n", "s", "m", "l", "x"]
# sum(p.numel() for p in model.parameters()) of the reference models, each config loaded in a fresh process
# (shared parameters counted once). These are the models of the released checkpoints: the reference README's
# 4M / 10M / 19M / 31M / 62M, and HuggingFace's conversion of those checkpoints (decoder FFN 1024 for S..X, no
# learnable affine blocks in the L and X backbones).
REFERENCE_PARAMS = {"n": 3_782_693, "s": 10_321_877, "m": 19_590_064, "l": 31_244_152, "x": 62_621_560}
# The same, measured by loading the reference configs n, s, m, l, x one after another in ONE process. The
# reference's load_config(file_path, cfg=dict()) merges every file into its mutable default dict, so keys that a
# later file does not set leak from the earlier ones: N's decoder dim_feedforward 512 reaches S..X, and
# use_lab: True (N, S, M) reaches L and X. These figures are an artifact of that, not models anyone trained.
REFERENCE_PARAMS_ONE_PROCESS = {"n": 3_782_693, "s": 9_533_909, "m": 18_539_440, "l": 29_668_322, "x": 61_045_794}



# -- layers -----------------------------------------------------------------------------------------------


def test_mlp_shapes_and_activation_placement():
    mlp = MLP(4, 8, 2, 3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(8, 4), (8, 8), (2, 8)]
    for layer in mlp.layers:
        torch.nn.init.constant_(layer.weight, -1.0)
        torch.nn.init.zeros_(layer.bias)
    # relu after layers 0 and 1 zeroes the negative hidden values; no relu after the last layer.
    assert torch.equal(mlp(torch.ones(1, 4)), torch.zeros(1, 2))
    torch.nn.init.constant_(mlp.layers[0].weight, 1.0)
    torch.nn.init.constant_(mlp.layers[1].weight, 1.0)
    # hidden 4 -> 32 (kept by relu), then the last layer gives -8 * 32 without a relu
    assert torch.equal(mlp(torch.ones(1, 4)), torch.full((1, 2), -256.0))


def _attention_reading_one_cell(method: str) -> tuple[MSDeformableAttention, torch.Tensor, list]:
    attn = MSDeformableAttention(embed_dim=2, num_heads=1, num_levels=1, num_points=1, method=method)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
    value = torch.arange(8, dtype=torch.float32).reshape(1, 4, 2)  # a 2x2 map, channels (2i, 2i+1)
    return attn, value, [[2, 2]]


def test_deformable_attention_reads_the_cell_under_the_reference():
    attn, value, shapes = _attention_reading_one_cell("default")
    query = torch.zeros(1, 1, 2)
    # centre of cell (row 1, col 0) -> flat position 2 -> channels (4, 5)
    box = torch.tensor([[[[0.25, 0.75, 0.1, 0.1]]]])
    torch.testing.assert_close(attn(query, box, value, shapes), torch.tensor([[[4.0, 5.0]]]))
    point = torch.tensor([[[[0.75, 0.25]]]])  # cell (0, 1) -> channels (2, 3)
    torch.testing.assert_close(attn(query, point, value, shapes), torch.tensor([[[2.0, 3.0]]]))


def test_deformable_attention_bilinear_between_cells_and_discrete_cells():
    attn, value, shapes = _attention_reading_one_cell("default")
    midway = torch.tensor([[[[0.5, 0.25]]]])  # halfway between cells (0, 0) and (0, 1)
    torch.testing.assert_close(attn(torch.zeros(1, 1, 2), midway, value, shapes), torch.tensor([[[1.0, 2.0]]]))
    discrete, _, _ = _attention_reading_one_cell("discrete")
    assert not discrete.sampling_offsets.weight.requires_grad
    query = torch.zeros(1, 1, 2)
    # The reference's cell index is trunc(x * W + 0.5): x = 0.2 -> 0.9 -> column 0; y = 0.3 -> 1.1 -> row 1.
    torch.testing.assert_close(discrete(query, torch.tensor([[[[0.2, 0.3]]]]), value, shapes), torch.tensor([[[4.0, 5.0]]]))
    # x = 0.5 -> 1.5 -> column 1; y = 0.9 -> 2.3 -> row 2, clamped to 1 -> cell (1, 1)
    torch.testing.assert_close(discrete(query, torch.tensor([[[[0.5, 0.9]]]]), value, shapes), torch.tensor([[[6.0, 7.0]]]))
    # points left of the map read the first column
    torch.testing.assert_close(discrete(query, torch.tensor([[[[-0.4, 0.1]]]]), value, shapes), torch.tensor([[[0.0, 1.0]]]))


def test_deformable_attention_offsets_scale_with_box_and_points():
    attn = MSDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=[1, 2], method="default")
    assert torch.allclose(attn.num_points_scale, torch.tensor([1.0, 0.5, 0.5]))
    # Initial offsets: head h points along angle 2*pi*h/heads, point k of a level at distance k.
    bias = attn.sampling_offsets.bias.reshape(2, 3, 2)
    torch.testing.assert_close(bias[0], torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(bias[1], torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]]), atol=1e-6, rtol=0)
    value = torch.randn(1, 4 * 4 + 2 * 2, 8)
    levels = split_value_levels(value, [[4, 4], [2, 2]], 2)
    assert [tuple(v.shape) for v in levels] == [(2, 4, 4, 4), (2, 4, 2, 2)]
    out = attn(torch.randn(1, 5, 8), torch.rand(1, 5, 1, 4), levels, [[4, 4], [2, 2]])
    assert out.shape == (1, 5, 8)


def test_deformable_attention_with_value_projection():
    attn = MSDeformableAttention(embed_dim=8, num_heads=2, num_levels=1, num_points=2, value_proj=True)
    out = attn(torch.randn(2, 3, 8), torch.rand(2, 3, 1, 4), torch.randn(2, 9, 8), [[3, 3]])
    assert out.shape == (2, 3, 8)
    with pytest.raises(ValueError, match="one \\[B, L, C\\] tensor"):
        attn(torch.randn(2, 3, 8), torch.rand(2, 3, 1, 4), [torch.randn(4, 4, 3, 3)], [[3, 3]])


def test_anchors():
    anchors, valid = generate_anchors([[2, 2], [1, 1]], eps=0.01)
    centres = torch.sigmoid(anchors[0, :4])
    torch.testing.assert_close(centres[:, :2], torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))
    torch.testing.assert_close(centres[:, 2:], torch.full((4, 2), 0.05))
    torch.testing.assert_close(torch.sigmoid(anchors[0, 4]), torch.tensor([0.5, 0.5, 0.1, 0.1]))
    assert valid.all()
    anchors, valid = generate_anchors([[200, 200]], eps=0.01)  # centres 0.0025 and 0.0075 from each edge are invalid
    assert not valid[0, 0, 0] and torch.isinf(anchors[0, 0]).all() and valid.sum() == 196 * 196


# -- decoder options (small, no backbone) -----------------------------------------------------------------

SMALL = dict(
    num_classes=5, hidden_dim=32, num_queries=10, feat_channels=[16, 32], feat_strides=[8, 16], num_levels=3,
    num_points=[2, 2, 2], nhead=4, num_layers=3, dim_feedforward=64, num_denoising=8, reg_max=8, reg_scale=4,
)


def small_feats(size=64, batch=2):
    torch.manual_seed(0)
    return [torch.randn(batch, 16, size // 8, size // 8), torch.randn(batch, 32, size // 16, size // 16)]


def small_targets(batch=2):
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])}]
    targets += [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * (batch - 1)
    return targets


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"query_select_method": "agnostic"},
        {"query_select_method": "one2many"},
        {"cross_attn_method": "discrete"},
        {"learn_query_content": True},
        {"layer_scale": 2, "eval_idx": -2},
        {"num_denoising": 0},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_decoder_options_train_and_eval(options):
    decoder = DFINETransformer(**{**SMALL, **options}, eval_spatial_size=[64, 64])
    out = decoder.train()(small_feats(), small_targets())
    assert out["pred_logits"].shape == (2, 10, 5) and out["pred_corners"].shape == (2, 10, 36)
    assert len(out["aux_outputs"]) == 2 and out["enc_meta"]["class_agnostic"] == (
        options.get("query_select_method") == "agnostic"
    )
    assert ("dn_outputs" in out) == (decoder.num_denoising > 0)
    if "dn_outputs" in out:
        # 2 boxes max -> 8 // 2 = 4 groups of (2 positive + 2 negative) queries
        assert out["dn_meta"]["dn_num_split"] == [16, 10] and out["dn_outputs"][0]["pred_boxes"].shape == (2, 16, 4)
    loss = sum(t.sum() for t in _tensors(out))
    loss.backward()
    without_grad = [n for n, p in decoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad
    with torch.no_grad():
        evaluated = decoder.eval()(small_feats())
    assert set(evaluated) == {"pred_logits", "pred_boxes", "enc_topk_ind"}
    assert evaluated["pred_boxes"].shape == (2, 10, 4) and torch.isfinite(evaluated["pred_boxes"]).all()


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and tree.requires_grad:
            yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def test_decoder_eval_at_another_size_builds_its_anchors():
    """A model built for 64 evaluated at 96 equals one built for 96 (anchors follow the input)."""
    torch.manual_seed(0)
    built_64 = DFINETransformer(**SMALL, eval_spatial_size=[64, 64]).eval()
    built_96 = DFINETransformer(**SMALL, eval_spatial_size=[96, 96]).eval()
    state = {k: v for k, v in built_64.state_dict().items() if k not in ("anchors", "valid_mask")}
    built_96.load_state_dict(state, strict=False)
    with torch.no_grad():
        a, b = built_64(small_feats(96)), built_96(small_feats(96))
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])


def test_decoder_needs_targets_in_training():
    decoder = DFINETransformer(**SMALL).train()
    with pytest.raises(ValueError, match="needs `targets`"):
        decoder(small_feats())


def test_decoder_rejects_bad_settings():
    with pytest.raises(ValueError, match="query_select_method"):
        DFINETransformer(**{**SMALL, "query_select_method": "best"})
    with pytest.raises(ValueError, match="eval_idx"):
        DFINETransformer(**{**SMALL, "eval_idx": 3})


# -- whole models from the configs -------------------------------------------------------------------------
# Every D-FINE config runs forward + backward (and an eval forward) at 320 and at 640; each model is built once
# for both sizes, since building is the costly part on CPU.


def build(config: str, overrides=()):
    import dfine

    cfg = dfine.load_config(CONFIGS / config, overrides=list(overrides))
    return cfg, dfine.build_model(cfg, load_pretrained=False)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_equals_reference(size):
    import dfine

    _, model = build(f"dfine_{size}_coco.yml")
    assert count(model) == REFERENCE_PARAMS[size]
    # The one-process figures follow from the two leaked settings, and from nothing else.
    cfg = dfine.load_config(CONFIGS / f"dfine_{size}_coco.yml")
    if size != "n":
        cfg["model"]["decoder"]["dim_feedforward"] = 512
    if size in ("l", "x"):
        cfg["model"]["backbone"]["use_lab"] = True
    assert count(dfine.build_model(cfg, load_pretrained=False)) == REFERENCE_PARAMS_ONE_PROCESS[size]


_MODELS: dict[str, torch.nn.Module] = {}


def coco_model(size: str) -> torch.nn.Module:
    if size not in _MODELS:
        _MODELS.clear()  # keep one model in memory at a time
        torch.manual_seed(0)
        _MODELS[size] = build(f"dfine_{size}_coco.yml")[1]
    return _MODELS[size]


TRAIN_KEYS = ("pred_logits", "pred_boxes", "pred_corners", "ref_points", "aux_outputs", "pre_outputs",
              "enc_aux_outputs", "enc_meta", "dn_outputs", "dn_pre_outputs", "dn_meta")


def forward_backward(model: torch.nn.Module, resolution: int, num_classes: int) -> None:
    """One train step's forward and backward at batch 1, then an eval forward; every trainable parameter must
    get a gradient (DDP runs with find_unused_parameters off)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    images = torch.rand(1, 3, resolution, resolution)
    # labels 2 and 1 (the CrowdHuman model has one class: 0)
    targets = [{"labels": torch.tensor([2, 1]) % num_classes, "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.2]])}]
    out = model(images, targets)
    for key in TRAIN_KEYS:
        assert key in out, key
    sum(t.float().mean() for t in _tensors(out)).backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad, without_grad[:5]
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        evaluated = model(images)
    assert evaluated["pred_logits"].shape == (1, 300, num_classes)
    assert torch.isfinite(evaluated["pred_logits"]).all() and torch.isfinite(evaluated["pred_boxes"]).all()


@pytest.mark.parametrize("size", SIZES)
def test_every_size_train_eval_and_deploy(size):
    """One model build per size (the costly part on CPU) serves every check."""
    for resolution in (320, 640):
        forward_backward(coco_model(size), resolution, 80)
    check_deploy(size)


OTHER_CONFIGS = sorted(p.name for p in CONFIGS.glob("dfine_*_*.yml") if not p.name.endswith(("_coco.yml", "_demo.yml")))


def variant_overrides(config: str) -> list[str]:
    # custom configs leave the class count to the user (777 is a placeholder): a small one keeps the test fast
    return ["num_classes=3"] if "custom" in config else []


def model_key(config: str) -> str:
    """The model a config builds: its resolved model section and class count (the backbone's `pretrained` aside:
    build() never loads weights)."""
    import json

    import dfine

    cfg = dfine.load_config(CONFIGS / config, variant_overrides(config))
    model = copy.deepcopy(cfg["model"])
    model["backbone"].pop("pretrained", None)
    return json.dumps([model, cfg["num_classes"]], sort_keys=True)


@pytest.mark.parametrize("config", OTHER_CONFIGS)
def test_dataset_variant_configs_build_and_run(config):
    """Objects365, obj2coco, custom, obj2custom and CrowdHuman configs: the COCO architecture of their size with
    their own class count, checked by the parameter count. The N config of each dataset also runs forward and
    backward at 320 (the class-dependent heads are the same code at every size, and every size's architecture
    runs at 320 and 640 in test_every_size_train_eval_and_deploy), unless it builds exactly the model of the
    COCO config (obj2coco). The others are built on the meta device: every constructor runs with the config's
    arguments and every shape is made, without allocating or initialising weights (~7x faster on a CPU)."""
    size = config.split("_")[1]
    runs = size == "n" and model_key(config) != model_key("dfine_n_coco.yml")
    with torch.device("cpu" if runs else "meta"):
        cfg, model = build(config, overrides=variant_overrides(config))
    num_classes = cfg["num_classes"]
    assert model.decoder.num_classes == num_classes
    # Only the class-dependent parts differ from the COCO model: (hidden + 1) per class in each score head
    # (encoder + one per decoder layer) and one denoising embedding row per class.
    heads = 1 + len(model.decoder.dec_score_head)
    hidden = model.decoder.hidden_dim
    expected = REFERENCE_PARAMS[size] + (heads * (hidden + 1) + hidden) * (num_classes - 80)
    assert count(model) == expected
    if runs:
        forward_backward(model, 320, num_classes)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Seeded noise on every weight, as the reference data's perturbed model: with plain initialisation the
    encoder scores hardly depend on the image and the query order is decided by float ties."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def check_deploy(size: str) -> None:
    """Deploy (conv-BN fusion, branches merged, layers after eval_idx and unused heads dropped, W(n) frozen)
    changes the encoder output by ~1e-7. Queries whose encoder scores are that close may swap, so raw outputs
    are compared per selected anchor and detections per (anchor, class)."""
    import dfine

    cfg = dfine.load_config(CONFIGS / f"dfine_{size}_coco.yml")
    plain = _perturbed(copy.deepcopy(coco_model(size))).eval()
    deployed = copy.deepcopy(plain).deploy()
    decoder = deployed.decoder.decoder
    assert len(decoder.layers) == decoder.eval_idx + 1 and decoder.project is not None
    assert all(isinstance(h, torch.nn.Identity) for h in list(deployed.decoder.dec_score_head)[:-1])
    assert not any(k.endswith("project") for k in deployed.state_dict())
    torch.manual_seed(2)
    images = torch.rand(1, 3, 320, 320)
    sizes = torch.tensor([[500, 375]])
    with torch.no_grad():
        a, b = plain(images), deployed(images)
    assert_close_by_anchor(b, a, atol={"pred_logits": 1e-4, "pred_boxes": 1e-5}, min_shared=295)

    post = dfine.build_postprocessor(cfg)
    expected = post(a, sizes)[0]
    labels, boxes, scores = post.deploy()(b, sizes)
    torch.testing.assert_close(scores[0].sort().values, expected["scores"].sort().values, atol=1e-4, rtol=0)

    def by_anchor_and_class(output, labels, boxes, scores, remapped):
        queries = torch.topk(torch.sigmoid(output["pred_logits"][0]).flatten(), 300).indices // 80
        anchors = output["enc_topk_ind"][0][queries].tolist()
        table = {c: i for i, c in enumerate(post.category_ids.tolist())} if remapped else None
        return {(anchor, table[lab] if table else lab): box for anchor, lab, box in zip(anchors, labels.tolist(), boxes)}

    ours = by_anchor_and_class(b, labels[0], boxes[0], scores[0], remapped=False)
    theirs = by_anchor_and_class(a, expected["labels"], expected["boxes"], expected["scores"], remapped=True)
    shared = set(ours) & set(theirs)
    assert len(shared) >= 290, f"only {len(shared)} of 300 detections shared"
    for key in shared:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-2, rtol=0)  # pixels

    deployed.double()  # the frozen W(n) is a buffer: it follows the module's dtype and device
    assert decoder.project.dtype == torch.float64


def _empty_targets(batch: int) -> list[dict]:
    return [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(batch)]


def test_batch_without_targets_gives_the_same_loss_terms():
    """DDP: a rank whose batch has no object must produce the loss terms of the other ranks (the reference skips
    denoising then) and give every parameter a gradient; the empty denoising group carries zero queries."""
    import dfine

    cfg = dfine.load_config(CONFIGS / "dfine_n_coco.yml")
    criterion = dfine.build_criterion(cfg)
    model = coco_model("n").train()
    torch.manual_seed(4)
    images = torch.rand(2, 3, 320, 320)
    targets = [{"labels": torch.tensor([2, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.2]])},
               {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.6, 0.4, 0.2, 0.2]])}]
    try:
        with torch.no_grad():
            with_targets = criterion(model(images, targets), targets)
        model.zero_grad(set_to_none=True)
        empty = _empty_targets(2)
        out = model(images, empty)
        losses = criterion(out, empty)
        sum(losses.values()).backward()
        without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert list(losses) == list(with_targets)
    assert any(k.startswith("loss_vfl_dn_") for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert not without_grad, without_grad[:5]
    assert out["dn_meta"]["dn_num_split"] == [0, 300]
    assert out["dn_outputs"][0]["pred_boxes"].shape == (2, 0, 4)
    assert [len(i) for i in out["dn_meta"]["dn_positive_idx"]] == [0, 0]
    # Nothing to denoise: those terms are exactly zero.
    assert all(v.item() == 0 for k, v in losses.items() if "_dn_" in k and not k.startswith("loss_ddf"))
