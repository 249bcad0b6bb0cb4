"""Every registered component, built from its defaults and run on the CPU (as timm tests every registered model).

The parameters come from the registries themselves, so a component registered tomorrow is tested without anyone
remembering to. ``SETTINGS`` holds only what a component needs beyond its defaults: required arguments, or
smaller sizes so that the whole file stays fast; a new component with required arguments fails here until it is
given its entry. Each test checks properties that must hold for any correct component of its kind (shapes,
finite values, gradients reaching every trainable parameter that the output depends on), not particular values:
those are the business of the parity tests.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dfine.components import import_components
from dfine.registry import BACKBONES, CRITERIONS, DECODERS, ENCODERS, MATCHERS, SCHEDULERS, TRANSFORMS

import_components()

# beyond the defaults: required arguments, and small sizes (the defaults are the full models' sizes)
SETTINGS = {
    "backbone": {
        "HGNetV2": {"name": "B0", "pretrained": False},
        "PResNet": {"depth": 18, "pretrained": False},
    },
    "encoder": {
        "HybridEncoder": {"in_channels": [16, 24, 32], "hidden_dim": 16, "nhead": 2, "dim_feedforward": 32},
    },
    "decoder": {
        name: {"num_classes": 5, "hidden_dim": 32, "num_queries": 10, "feat_channels": [16, 32], "feat_strides": [8, 16],
               "num_levels": 3, "num_points": [2, 2, 2], "nhead": 4, "num_layers": 2, "dim_feedforward": 32,
               "num_denoising": 8, **({"reg_max": 8} if name == "DFINETransformer" else {})}
        for name in ("DFINETransformer", "RTDETRTransformerv2")
    },
    "matcher": {
        "HungarianMatcher": {"weight_dict": {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}, "use_focal_loss": True},
    },
    "criterion": {
        # configs/base/dfine_criterion.yml, with the small decoder's reg_max and class count
        "DFINECriterion": {
            "weight_dict": {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5},
            "losses": ["vfl", "boxes", "local"], "alpha": 0.75, "gamma": 2.0, "num_classes": 5, "reg_max": 8,
        },
    },
    "transform": {
        "Resize": {"size": [24, 40]},
        "RandomPhotometricDistort": {"p": 1.0},
        "RandomZoomOut": {"p": 1.0},
        "RandomIoUCrop": {"p": 1.0},
        "RandomHorizontalFlip": {"p": 1.0},
    },
    "scheduler": {
        "FlatCosineLR": {"flat_epoch": 1, "iter_per_epoch": 2, "total_epochs": 4, "no_aug_epoch": 1},
        "MultiStepLR": {"milestones": [2, 4]},
    },
}


def shipped(registry) -> list[str]:
    """The names dfine itself registers (other test modules register small stand-ins in the same registries)."""
    return sorted(name for name in registry if registry.get(name).__module__.startswith("dfine."))


class SampleSource:
    """The dataset side of ops that draw more images (``needs_dataset``, e.g. Mosaic): copies of one sample."""

    def __len__(self) -> int:
        return 3

    def load_item(self, index: int):
        return sample()


def build(kind: str, registry, name: str, **provided):
    return registry.get(name)(**SETTINGS[kind].get(name, {}), **provided)


def assert_gradients_reach(module: torch.nn.Module, name: str) -> None:
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable, f"{name} has no trainable parameter"
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{name}: no gradient reached {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable), f"{name}: non-finite gradients"


def targets_for(batch: int = 2) -> list[dict]:
    """Image 0 has two objects, image 1 none (the empty case every component must take)."""
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])}]
    return targets + [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * (batch - 1)


def decoder_feats(batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 16, 8, 8, generator=g), torch.randn(batch, 32, 4, 4, generator=g)]


@pytest.mark.parametrize("name", shipped(BACKBONES))
def test_backbone(name):
    torch.manual_seed(0)
    model = build("backbone", BACKBONES, name).train()
    feats = model(torch.rand(1, 3, 64, 64))
    assert len(feats) == len(model.out_channels) == len(model.out_strides)
    for feat, channels, stride in zip(feats, model.out_channels, model.out_strides):
        assert feat.shape == (1, channels, 64 // stride, 64 // stride) and torch.isfinite(feat).all()
    sum(f.float().square().mean() for f in feats).backward()
    # frozen stages and frozen norms keep no gradient by design: only parameters left trainable are checked,
    # and the deepest returned stage depends on all of them
    assert_gradients_reach(model, name)


@pytest.mark.parametrize("name", shipped(ENCODERS))
def test_encoder(name):
    torch.manual_seed(0)
    model = build("encoder", ENCODERS, name).train()
    channels = SETTINGS["encoder"].get(name, {}).get("in_channels", [512, 1024, 2048])
    feats = [torch.randn(2, c, 8 // 2**i, 8 // 2**i) for i, c in enumerate(channels)]
    outs = model(feats)
    assert [tuple(o.shape[2:]) for o in outs] == [tuple(f.shape[2:]) for f in feats]
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    assert_gradients_reach(model, name)


@pytest.mark.parametrize("name", shipped(DECODERS))
def test_decoder(name):
    torch.manual_seed(0)
    model = build("decoder", DECODERS, name).train()
    out = model(decoder_feats(), targets_for())
    queries, classes = model.num_queries, model.num_classes
    assert out["pred_logits"].shape == (2, queries, classes) and out["pred_boxes"].shape == (2, queries, 4)
    assert torch.isfinite(out["pred_logits"]).all() and ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    loss = out["pred_logits"].square().mean() + out["pred_boxes"].mean()
    for extra in out.get("aux_outputs", []) + out.get("enc_aux_outputs", []):
        loss = loss + extra["pred_logits"].square().mean() + extra["pred_boxes"].mean()
    for extra in out.get("dn_outputs", out.get("dn_aux_outputs", [])):
        loss = loss + extra["pred_logits"].square().mean() + extra["pred_boxes"].mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.query_pos_head.layers[0].weight.grad is not None  # the refinement layers were reached
    model.eval()
    with torch.no_grad():
        evaluated = model(decoder_feats())
    assert evaluated["pred_boxes"].shape == (2, queries, 4)


@pytest.mark.parametrize("name", shipped(MATCHERS))
def test_matcher(name):
    matcher = build("matcher", MATCHERS, name)
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 6, 5, generator=g), "pred_boxes": torch.rand(2, 6, 4, generator=g) * 0.5 + 0.25}
    assignment = matcher(outputs, targets_for())
    queries, objects = assignment[0]
    # one-to-one: every object of image 0 gets a distinct query; image 1 has no object, hence no pair
    assert sorted(objects.tolist()) == [0, 1] and len(set(queries.tolist())) == 2
    assert assignment[1][0].numel() == 0


@pytest.mark.parametrize("name", shipped(CRITERIONS))
def test_criterion(name):
    torch.manual_seed(0)
    decoder = build("decoder", DECODERS, "DFINETransformer").train()
    matcher = build("matcher", MATCHERS, "HungarianMatcher")
    criterion = build("criterion", CRITERIONS, name, matcher=matcher)
    targets = targets_for()
    losses = criterion(decoder(decoder_feats(), targets), targets)
    assert losses and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert decoder.dec_score_head[-1].weight.grad is not None and decoder.dec_bbox_head[-1].layers[-1].weight.grad is not None


def sample():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    target = {"boxes": np.array([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 30.0]], np.float32),
              "labels": torch.tensor([1, 2]), "area": torch.tensor([884.0, 800.0]), "iscrowd": torch.tensor([0, 0])}
    return image, target


@pytest.mark.parametrize("name", shipped(TRANSFORMS))
def test_transform(name):
    random.seed(0)
    op = build("transform", TRANSFORMS, name)
    if getattr(op, "needs_dataset", False):
        op.bind(SampleSource())
    image, target = sample()
    out_image, out_target = op(image, target)
    # every op keeps one box per label, boxes inside the image while they are pixels
    boxes = out_target["boxes"]
    assert len(boxes) == len(out_target["labels"])
    if isinstance(boxes, np.ndarray) and isinstance(out_image, np.ndarray):
        height, width = out_image.shape[:2]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
        assert out_image.dtype == np.uint8 and out_image.shape[2] == 3


@pytest.mark.parametrize("name", shipped(SCHEDULERS))
def test_scheduler(name):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = build("scheduler", SCHEDULERS, name, optimizer=optimizer)
    lrs = []
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(0 < lr <= 0.1 + 1e-12 for lr in lrs), lrs
    state = scheduler.state_dict()
    assert isinstance(state, dict)
