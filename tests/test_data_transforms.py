"""Transforms keep boxes on their objects: draw a solid rectangle, transform, compare the box with the pixels."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dfine.data.transforms import (
    Compose,
    ConvertBoxes,
    ConvertPILImage,
    RandomHorizontalFlip,
    RandomIoUCrop,
    RandomPhotometricDistort,
    RandomZoomOut,
    Resize,
    SanitizeBoundingBoxes,
)
from dfine.data.throughput import reference_training_ops

RED = (255, 0, 0)


def rectangle_sample(box=(40, 30, 110, 90), size=(120, 160)):
    """A grey image with one red rectangle covering pixels [x1, x2) x [y1, y2), and its target."""
    image = np.full((*size, 3), 128, np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = RED
    target = {"boxes": np.array([box], np.float32), "labels": np.array([3]), "area": np.array([1.0], np.float32),
              "iscrowd": np.array([0])}
    return image, target


def red_extent(image: np.ndarray):
    """(x1, y1, x2, y2) bounding the red pixels, or None."""
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
    ys, xs = np.nonzero(red)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("op", [RandomZoomOut(p=1.0), RandomIoUCrop(p=1.0), RandomHorizontalFlip(p=1.0),
                                Resize([64, 96]), Resize(100)], ids=lambda op: type(op).__name__)
def test_geometric_op_box_bounds_the_object(op, seed):
    random.seed(seed)
    image, target = rectangle_sample()
    out_image, out_target = op(image, target)
    out_image, out_target = SanitizeBoundingBoxes(1)(out_image, out_target)
    height, width = out_image.shape[:2]
    boxes = out_target["boxes"]
    assert len(boxes) == len(out_target["labels"]) == len(out_target["area"])
    if len(boxes) == 0:
        return  # the crop dropped the object (its centre fell outside)
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
    extent = red_extent(out_image)
    assert extent is not None
    # resampling blurs one pixel at the rectangle's edges
    np.testing.assert_allclose(boxes[0], extent, atol=1.5)


def test_flip_mirrors_exactly():
    image, target = rectangle_sample()
    out_image, out_target = RandomHorizontalFlip(p=1.0)(image, target)
    np.testing.assert_array_equal(out_target["boxes"][0], [160 - 110, 30, 160 - 40, 90])
    np.testing.assert_array_equal(out_image, image[:, ::-1])


def test_photometric_distort_keeps_geometry_and_range():
    random.seed(0)
    image, target = rectangle_sample()
    before = target["boxes"].copy()
    changed = 0
    for _ in range(20):
        out, out_target = RandomPhotometricDistort(p=1.0)(image.copy(), target)
        assert out.shape == image.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out_target["boxes"], before)
        changed += int(not np.array_equal(out, image))
    assert changed == 20


def test_sanitize_drops_small_and_inverted_boxes_with_their_fields():
    image = np.zeros((50, 50, 3), np.uint8)
    target = {"boxes": np.array([[0, 0, 10, 10], [5, 5, 5.5, 20], [30, 30, 20, 40], [45, 45, 80, 80]], np.float32),
              "labels": np.array([1, 2, 3, 4]), "area": np.arange(4, dtype=np.float32), "iscrowd": np.zeros(4, int)}
    _, out = SanitizeBoundingBoxes(min_size=1)(image, target)
    np.testing.assert_array_equal(out["labels"], [1, 4])
    np.testing.assert_array_equal(out["boxes"][1], [45, 45, 50, 50])  # clipped to the image
    np.testing.assert_array_equal(out["area"], [0, 3])


def test_convert_boxes_normalised_cxcywh():
    image = torch.zeros(3, 100, 200)
    _, out = ConvertBoxes("cxcywh", True)(image, {"boxes": np.array([[20, 10, 60, 50]], np.float32)})
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]]))


@pytest.mark.parametrize("seed", range(25))
def test_full_training_pipeline_outputs_valid_boxes(seed):
    random.seed(seed)
    image, target = rectangle_sample()
    out_image, out_target = Compose(reference_training_ops(64))(image, target, epoch=0)
    assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
    assert 0.0 <= float(out_image.min()) and float(out_image.max()) <= 1.0
    boxes = out_target["boxes"]
    assert boxes.dtype == torch.float32 and len(boxes) == len(out_target["labels"])
    if len(boxes):
        assert (boxes[:, 2:] > 0).all()
        x1y1, x2y2 = boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2
        assert (x1y1 >= -1e-6).all() and (x2y2 <= 1 + 1e-6).all()


class Spy:
    def __init__(self):
        self.calls = 0

    def __call__(self, image, target):
        self.calls += 1
        return image, target


def test_stop_epoch_policy_switches_named_ops_off():
    class RandomZoomOut(Spy):  # noqa: N801 - the policy matches by class name, like the reference
        pass

    zoom, always = RandomZoomOut(), Spy()
    compose = Compose([zoom, always], policy={"name": "stop_epoch", "epoch": 3, "ops": ["RandomZoomOut"]})
    for epoch in range(6):
        compose(None, {}, epoch=epoch)
    assert zoom.calls == 3 and always.calls == 6
    assert compose.stopped_ops(2) == set() and compose.stopped_ops(3) == {"RandomZoomOut"}


def test_convert_pil_image_scales_to_unit_range():
    image = np.full((4, 5, 3), 255, np.uint8)
    out, _ = ConvertPILImage("float32", True)(image, {})
    assert out.shape == (3, 4, 5) and out.dtype == torch.float32 and float(out.max()) == 1.0
