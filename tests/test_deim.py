"""The DEIM recipe: MAL (hand-computed and against DEIM's recorded loss dicts), Mosaic and Mixup keep boxes on
their pixels, the [start, flat, stop] policy and the Mixup window, flat-cosine with quadratic warm-up, the
schedule table, and config errors."""

from __future__ import annotations

import math
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import dfine
from dfine.data.collate import BatchImageCollateFunction, mix_batch
from dfine.data.mosaic import Mosaic
from dfine.data.transforms import Compose
from dfine.engine.optim import FlatCosineLR
from dfine.engine.phases import PhaseSchedule
from dfine.losses import functional as L
from dfine.registry import ConfigError
from test_criterion_parity import load_reference, synthetic_outputs

REPO_ROOT = Path(__file__).resolve().parents[1]
DEIM_N = REPO_ROOT / "configs" / "deim_dfine_n_coco.yml"


# ------------------------------------------------------------------------------------------------- MAL


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


@pytest.mark.parametrize("mal_alpha", [None, 0.3])
def test_mal_hand_computed(mal_alpha):
    # one image, two queries, two classes; query 0 matched to class 1 with IoU 0.6
    logits = torch.tensor([[[0.4, -0.7], [1.2, -2.0]]], dtype=torch.float64)
    gamma, iou, num_boxes = 1.5, 0.6, 2.0
    expected = 0.0
    for q in range(2):
        for c in range(2):
            x = logits[0, q, c].item()
            if (q, c) == (0, 1):
                expected += _bce(x, iou**gamma)  # weight 1, target IoU^gamma
            else:
                weight = (1 / (1 + math.exp(-x))) ** gamma * (1.0 if mal_alpha is None else mal_alpha)
                expected += weight * _bce(x, 0.0)
    expected /= num_boxes
    got = L.matchability_aware_loss(
        logits, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.tensor([iou], dtype=torch.float64),
        num_boxes, gamma=gamma, alpha=mal_alpha,
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_mal_gradient_does_not_flow_through_iou_or_weights():
    logits = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    ious = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    L.matchability_aware_loss(logits, torch.tensor([0]), torch.tensor([2]), torch.tensor([1]), ious, 1.0).backward()
    assert ious.grad is None and torch.isfinite(logits.grad).all()
    # an unmatched entry's gradient is weight * (p - 0) with the weight p^gamma held constant
    p = logits.detach().sigmoid()[0, 0, 0].item()
    assert logits.grad[0, 0, 0].item() == pytest.approx(p**1.5 * p, rel=1e-10)


@pytest.mark.parametrize("variant", ["perturbed", "random"])
def test_deim_n_config_reproduces_reference_loss_dict(reference_dir, variant):
    outputs, targets, _ = load_reference(reference_dir, variant)
    path = reference_dir / "deim" / f"deim_ref_n_{variant}_train640.pt"
    if not path.is_file():
        pytest.skip(f"DEIM reference data not found at {path}")
    expected = torch.load(path, weights_only=True)["loss_dict"]
    criterion = dfine.build_criterion(dfine.load_config(DEIM_N))
    losses = criterion(outputs, targets)
    assert any(k.startswith("loss_mal") for k in expected)
    for key, value in expected.items():
        assert key in losses, key
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-12), key
    for key in set(losses) - set(expected):
        # the reference leaves out DDF terms that are exactly zero (a layer that is its own teacher)
        assert losses[key].item() == 0.0, key


@pytest.mark.parametrize("sizes", [[0, 3], [0, 0]], ids=["one-empty-image", "all-empty"])
def test_deim_criterion_with_empty_targets(sizes):
    criterion = dfine.build_criterion(dfine.load_config(DEIM_N))
    outputs, targets = synthetic_outputs(sizes)
    losses = criterion(outputs, targets)
    assert "loss_mal" in losses and "loss_mal_dn_pre" in losses and "loss_vfl" not in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    if sum(sizes) == 0:
        # nothing matched: every entry is a negative, weight p^1.5, target 0; num_boxes clamps to 1
        logits = outputs["pred_logits"].detach().double()
        p = logits.sigmoid()
        expected = (p.pow(1.5) * -torch.log1p(-p)).sum().item()
        assert losses["loss_mal"].item() == pytest.approx(expected, rel=1e-5)


def test_mal_without_box_losses_is_a_config_error(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(textwrap.dedent(f"""\
        __include__: [{DEIM_N}]
        criterion:
          losses: [mal]
        """))
    with pytest.raises(ConfigError, match=r"criterion\.losses.*boxes"):
        dfine.build_criterion(dfine.load_config(path))


# ------------------------------------------------------------------------------------------------- Mosaic

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


class RectangleImages:
    """A dataset whose every load_item gives a grey image with one rectangle of the next colour (label = colour)."""

    def __init__(self, rng: random.Random):
        self.rng, self.calls = rng, 0

    def __len__(self):
        return 10

    def load_item(self, index):
        self.calls += 1
        return rectangle(self.rng, self.calls % len(COLOURS))


def rectangle(rng: random.Random, label: int):
    height, width = rng.randint(200, 400), rng.randint(200, 400)
    image = np.full((height, width, 3), 128, np.uint8)
    x1, y1 = rng.randint(0, width - 40), rng.randint(0, height - 40)
    x2, y2 = rng.randint(x1 + 20, width), rng.randint(y1 + 20, height)
    image[y1:y2, x1:x2] = COLOURS[label]
    target = {"boxes": np.array([[x1, y1, x2, y2]], np.float32), "labels": np.array([label]),
              "area": np.array([float((x2 - x1) * (y2 - y1))], np.float32), "iscrowd": np.array([0]),
              "image_id": np.array([7]), "orig_size": np.array([width, height])}
    return image, target


def colour_extent(image: np.ndarray, colour) -> np.ndarray | None:
    ys, xs = np.nonzero((image == np.array(colour, np.uint8)).all(-1))
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("seed", range(16))
def test_mosaic_boxes_bound_their_pixels(seed):
    random.seed(seed)
    rng = random.Random(1000 + seed)
    mosaic = Mosaic(output_size=160, rotation_range=10, translation_range=(0.1, 0.1), scaling_range=(0.5, 1.5),
                    fill_value=0)
    mosaic.bind(RectangleImages(rng))
    image, target = rectangle(rng, 0)
    out_image, out = mosaic(image, target)
    height, width = out_image.shape[:2]
    assert height >= 2 * 160 and width >= 2 * 160  # 2 x 2 cells of images whose shorter side is 160
    assert out["image_id"].tolist() == [7] and out["orig_size"].tolist() == target["orig_size"].tolist()
    boxes, labels = out["boxes"], out["labels"]
    assert len(boxes) == len(labels) == len(out["area"]) == len(out["iscrowd"])
    assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()  # no empty or inverted box
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
    for label, colour in enumerate(COLOURS):
        extent = colour_extent(out_image, colour)
        mine = boxes[labels == label]
        if extent is None:
            assert len(mine) == 0, "a box without pixels"
            continue
        if len(mine) == 0:
            # dropped: what is left on the canvas is a sliver narrower than a pixel-sized box
            assert min(extent[2] - extent[0], extent[3] - extent[1]) <= 2
            continue
        # several images may share a colour: the union of their boxes bounds the union of their pixels
        union = np.concatenate([mine[:, :2].min(0), mine[:, 2:].max(0)])
        # area-resizing blends the edge pixels and nearest-neighbour sampling moves an edge by up to a pixel;
        # measured over these seeds: <= 1.5 px unclipped
        assert (extent[:2] >= union[:2] - 1.5).all() and (extent[2:] <= union[2:] + 1.5).all()
        clipped = (union[:2] <= 0).any() or union[2] >= width or union[3] >= height
        if len(mine) == 1 and not clipped:
            # tight too; a clipped box encloses the rotated corners cut off by the canvas, so it may be larger
            assert np.abs(extent - union).max() <= 2.5


def test_mosaic_needs_a_three_boundary_policy():
    with pytest.raises(ConfigError, match="policy"):
        Compose([Mosaic()], policy={"name": "stop_epoch", "epoch": 5, "ops": ["Mosaic"]})


# ------------------------------------------------------------------------------------------------- policy


def _recording_op(name: str, log: list):
    def call(self, image, target):
        log.append(name)
        return image, target

    return type(name, (), {"__call__": call})()


def test_policy_windows_and_mosaic_probability():
    log: list = []
    names = ["Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop", "RandomHorizontalFlip"]
    compose = Compose([_recording_op(n, log) for n in names], mosaic_prob=0.3,
                      policy={"name": "stop_epoch", "epoch": [2, 5, 8], "ops": names[:4]})
    random.seed(0)
    trials = 2000
    for epoch in range(10):
        counts = dict.fromkeys(names, 0)
        for _ in range(trials):
            log.clear()
            compose(None, {}, epoch=epoch)
            for n in log:
                counts[n] += 1
            if "Mosaic" in log:  # mosaic replaces zoom-out and crop for that sample
                assert "RandomZoomOut" not in log and "RandomIoUCrop" not in log
        assert counts["RandomHorizontalFlip"] == trials  # not a policy op: always on
        if epoch < 2 or epoch >= 8:
            assert counts["Mosaic"] == counts["RandomPhotometricDistort"] == counts["RandomZoomOut"] == 0
        elif epoch < 5:
            # binomial(2000, 0.3): sd ~20.5; 5 sd
            assert abs(counts["Mosaic"] - 0.3 * trials) < 5 * math.sqrt(trials * 0.3 * 0.7)
            assert counts["RandomZoomOut"] == trials - counts["Mosaic"]
            assert counts["RandomPhotometricDistort"] == trials
        else:
            assert counts["Mosaic"] == 0 and counts["RandomZoomOut"] == counts["RandomIoUCrop"] == trials
    assert compose.stopped_ops(8) == set(names[:4]) and compose.stopped_ops(6) == {"Mosaic"}


@pytest.mark.parametrize("bounds", [[4, 4, 10], [5, 3, 10], [4, 8], [-1, 3, 10]])
def test_policy_boundaries_must_increase(bounds):
    with pytest.raises(ConfigError, match="policy.epoch"):
        Compose([], policy={"name": "stop_epoch", "epoch": bounds, "ops": []})


# ------------------------------------------------------------------------------------------------- Mixup


def _colour_items(n: int, epoch: int, step: int, size: int = 32):
    items = []
    for i in range(n):
        image = torch.zeros(3, size, size)
        image[i % 3, 4 + i:20 + i, 6:26] = 1.0
        target = {"boxes": torch.tensor([[(16 + 0.0) / size, (12 + i) / size, 20 / size, 16 / size]]),
                  "labels": torch.tensor([i]), "area": torch.tensor([320.0]), "image_id": torch.tensor([i])}
        items.append((image, target, (epoch, step)))
    return items


def test_mixup_blends_neighbours_and_keeps_boxes_with_their_pixels():
    items = _colour_items(4, 0, 0)
    images = torch.stack([im for im, _, _ in items])
    targets = [t for _, t, _ in items]
    mixed, out = mix_batch(images, targets, 0.52)
    for i in range(4):
        prev = (i - 1) % 4
        torch.testing.assert_close(mixed[i], 0.52 * images[i] + 0.48 * images[prev])
        assert out[i]["labels"].tolist() == [i, prev]
        torch.testing.assert_close(out[i]["boxes"], torch.cat([targets[i]["boxes"], targets[prev]["boxes"]]))
        assert out[i]["image_id"].tolist() == [i]
        # each box still covers its object's colour, at that image's share of the blend
        for (cx, cy, w, h), share, src in zip(out[i]["boxes"].tolist(), (0.52, 0.48), (i, prev)):
            x1, y1 = round((cx - w / 2) * 32), round((cy - h / 2) * 32)
            x2, y2 = round((cx + w / 2) * 32), round((cy + h / 2) * 32)
            patch = mixed[i, src % 3, y1:y2, x1:x2]
            assert patch.min().item() >= share - 1e-6
    assert len(targets[0]["labels"]) == 1  # inputs untouched


def test_mixup_window_probability_and_same_decision_on_every_rank():
    kwargs = dict(base_size=32, base_size_repeat=None, seed=5, mixup_prob=0.5, mixup_epochs=[2, 4])
    rank0, rank1 = BatchImageCollateFunction(**kwargs), BatchImageCollateFunction(**kwargs)
    steps = 1000
    for epoch in range(6):
        fired = 0
        for step in range(steps):
            ratio = rank0.mixup_for(epoch, step)
            assert ratio == rank1.mixup_for(epoch, step)  # a function of (seed, epoch, step) only
            if ratio is not None:
                fired += 1
                assert 0.45 <= ratio <= 0.55
        if 2 <= epoch < 4:
            assert abs(fired - steps / 2) < 5 * math.sqrt(steps / 4)  # binomial(1000, 0.5), 5 sd
        else:
            assert fired == 0
    # and the batches two ranks build at a firing step have mixed targets of twice the boxes
    step = next(s for s in range(steps) if rank0.mixup_for(2, s) is not None)
    _, targets = rank0(_colour_items(2, 2, step))
    assert [len(t["labels"]) for t in targets] == [2, 2]
    _, targets = rank1(_colour_items(2, 5, step))
    assert [len(t["labels"]) for t in targets] == [1, 1]


# ------------------------------------------------------------------------------------------------- schedule


def test_flat_cosine_with_quadratic_warmup_closed_form():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    # 10 epochs of 10 steps: warm-up 8 steps, flat to step 40, cosine to step 80, floor for the last 2 epochs
    sched = FlatCosineLR(opt, lr_gamma=0.5, flat_epoch=4, iter_per_epoch=10, total_epochs=10, no_aug_epoch=2,
                         warmup_iter=8)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[4] == pytest.approx(2.0 * (4 / 8) ** 2)
    assert lrs[8] == pytest.approx(2.0) and lrs[9] == pytest.approx(2.0) and lrs[40] == pytest.approx(2.0)
    assert lrs[60] == pytest.approx(2.0 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 20 / 40))))
    assert lrs[79] == pytest.approx(2.0 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 39 / 40))))
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:9], lrs[1:9]))  # rising warm-up


def test_schedule_table_shows_the_windows():
    cfg = dfine.load_config(DEIM_N)
    schedule = PhaseSchedule.from_config(cfg, batches_per_epoch=100, warmup_steps=0, multi_scale=False)
    assert schedule.mosaic_window == (4, 78) and schedule.mixup_window == (4, 78) and schedule.warmup_steps == 2000
    table = schedule.table()
    assert "quadratically" in table
    dense = next(line for line in table.splitlines() if "dense O2O" in line)
    assert "4 - 78" in dense and "400 - 7800" in dense and "mosaic p=0.5 + mixup p=0.5" in dense
    assert "78 - 148" in next(line for line in table.splitlines() if line.startswith("  D-FINE aug"))
    assert "148 - 160" in next(line for line in table.splitlines() if line.startswith("no-augmentation"))


@pytest.mark.parametrize("override, key", [
    ("train_dataloader.dataset.transforms.policy.epoch=[4,4,148]", "policy.epoch"),
    ("train_dataloader.dataset.transforms.policy.epoch=[4,78,170]", "policy.epoch"),
    ("train_dataloader.collate_fn.mixup_epochs=[4,150]", "mixup_epochs"),
    ("lr_warmup_scheduler={type: LinearWarmup, warmup_duration: 10}", "warmup"),
])
def test_bad_windows_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        cfg = dfine.load_config(DEIM_N, [override])
        PhaseSchedule.from_config(cfg, batches_per_epoch=10, warmup_steps=0)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("deim_*.yml")), ids=lambda p: p.name)
def test_deim_configs_load_with_their_recipe(path):
    cfg = dfine.load_config(path)
    assert cfg["criterion"]["losses"] == ["mal", "boxes", "local"] and cfg["criterion"]["gamma"] == 1.5
    assert cfg["lr_scheduler"]["type"] == "FlatCosineLR" and not cfg.get("lr_warmup_scheduler")
    assert cfg["model"]["decoder"]["activation"] == cfg["model"]["decoder"]["mlp_act"] == "silu"
    policy = cfg["train_dataloader"]["dataset"]["transforms"]["policy"]["epoch"]
    assert policy[2] == cfg["stop_epoch"] and policy[1] == cfg["lr_scheduler"]["flat_epoch"]
    assert cfg["train_dataloader"]["collate_fn"]["mixup_epochs"] == policy[:2]
    PhaseSchedule.from_config(cfg, batches_per_epoch=10, warmup_steps=0)
