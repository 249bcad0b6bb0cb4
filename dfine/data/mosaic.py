"""DEIM's Mosaic (Dense O2O, arXiv 2412.04234): four images on one canvas, so one-to-one matching sees more
positive targets per image. On numpy + OpenCV like the other transforms (dfine/data/transforms.py).

The transform draws its three extra images from the dataset it is bound to (``Compose.bind``, called by the
dataset), with Python's ``random`` module, which the DataLoader seeds per worker. Whether it fires at all is
decided by the Compose policy (``mosaic_prob`` inside the mosaic window), as in the reference.
"""

from __future__ import annotations

import random
from typing import Sequence

import cv2
import numpy as np

from dfine.data.transforms import PER_BOX_KEYS, Resize, _pixel_boxes
from dfine.registry import TRANSFORMS, ConfigError


def affine_matrix(width: int, height: int, angle: float, translate: tuple[float, float], scale: float) -> np.ndarray:
    """[2, 3] forward map of a rotation by ``angle`` degrees (counter-clockwise on screen) and a scaling about the
    image centre, then a shift by ``translate`` pixels: torchvision's RandomAffine without shear."""
    matrix = cv2.getRotationMatrix2D((width * 0.5, height * 0.5), angle, scale)
    matrix[:, 2] += np.asarray(translate, dtype=np.float64)
    return matrix


def _clip_polygon(points: list, width: float, height: float) -> list:
    """Sutherland-Hodgman: the part of a convex polygon [(x, y), ...] inside [0, width] x [0, height]."""
    edges = ((0, 0.0, 1), (0, float(width), -1), (1, 0.0, 1), (1, float(height), -1))  # (axis, limit, side)
    for axis, limit, side in edges:
        if not points:
            break
        kept = []
        for i, current in enumerate(points):
            previous = points[i - 1]
            inside_now = side * (current[axis] - limit) >= 0
            inside_before = side * (previous[axis] - limit) >= 0
            if inside_now != inside_before:
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                kept.append(tuple(p + t * (c - p) for p, c in zip(previous, current)))
            if inside_now:
                kept.append(current)
        points = kept
    return points


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """[N, 4] xyxy pixel boxes -> the axis-aligned boxes enclosing the part of each mapped box that lies on the
    image (a box entirely off the image becomes [0, 0, 0, 0]). Clipping the mapped quadrilateral before taking
    its extent keeps a rotated box that leaves the image from claiming empty corners of the canvas."""
    out = np.zeros((len(boxes), 4), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(np.float64)):
        corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]) @ matrix[:, :2].T + matrix[:, 2]
        clipped = _clip_polygon([tuple(c) for c in corners], width, height)
        if clipped:
            points = np.asarray(clipped)
            out[i] = [*points.min(axis=0), *points.max(axis=0)]
    return np.clip(out, 0, np.array([width, height, width, height], np.float32))  # float error at the edges


@TRANSFORMS.register
class Mosaic:
    """Four images (this one and three drawn at random from the dataset), each resized so its shorter side is
    ``output_size``, pasted top-left aligned into the 2 x 2 cells of a canvas of twice the largest height and
    width (filled with 0), then one random affine of the whole canvas: rotation uniform in
    ±``rotation_range`` degrees, shift uniform in ±``translation_range`` of the canvas size, scale uniform in
    ``scaling_range``, uncovered pixels ``fill_value``. Boxes follow their pixels (the enclosing box of the
    mapped corners, clipped); boxes left narrower or lower than ``min_size`` pixels are dropped.

    ``probability`` is the transform's own firing rate (DEIM's configs keep it at 1 and let the Compose's
    ``mosaic_prob`` decide).
    """

    needs_dataset = True

    def __init__(self, output_size: int = 320, rotation_range: float = 0.0,
                 translation_range: Sequence[float] = (0.1, 0.1), scaling_range: Sequence[float] = (0.5, 1.5),
                 probability: float = 1.0, fill_value: int = 114, min_size: float = 1.0):
        if not isinstance(output_size, int) or output_size < 1:
            raise ConfigError(f"Mosaic.output_size must be a positive int, not {output_size!r}")
        if len(translation_range) != 2 or len(scaling_range) != 2 or not 0 < scaling_range[0] <= scaling_range[1]:
            raise ConfigError(f"Mosaic: translation_range and scaling_range must be pairs with 0 < min <= max, got "
                              f"{translation_range}, {scaling_range}")
        self.resize = Resize(output_size)
        self.rotation_range = float(rotation_range)
        self.translation_range = tuple(float(t) for t in translation_range)
        self.scaling_range = tuple(float(s) for s in scaling_range)
        self.probability = float(probability)
        self.fill_value = int(fill_value)
        self.min_size = float(min_size)
        self.dataset = None

    def bind(self, dataset) -> None:
        """The dataset the extra images come from (needs ``len`` and ``load_item(index)``)."""
        self.dataset = dataset

    def draw_affine(self, width: int, height: int) -> np.ndarray:
        angle = random.uniform(-self.rotation_range, self.rotation_range)
        max_dx, max_dy = self.translation_range[0] * width, self.translation_range[1] * height
        shift = (round(random.uniform(-max_dx, max_dx)), round(random.uniform(-max_dy, max_dy)))
        scale = random.uniform(*self.scaling_range)
        return affine_matrix(width, height, angle, shift, scale)

    def __call__(self, image: np.ndarray, target: dict):
        if self.probability < 1.0 and random.random() > self.probability:
            return image, target
        if self.dataset is None:
            raise ConfigError("Mosaic needs a dataset to draw images from; it must be inside a dataset's transforms")
        _pixel_boxes(target, "Mosaic")
        samples = [self.resize(image, target)]
        for index in random.choices(range(len(self.dataset)), k=3):
            samples.append(self.resize(*self.dataset.load_item(index)))
        cell_h = max(img.shape[0] for img, _ in samples)
        cell_w = max(img.shape[1] for img, _ in samples)
        canvas = np.zeros((2 * cell_h, 2 * cell_w, 3), dtype=image.dtype)
        boxes, per_box = [], {key: [] for key in PER_BOX_KEYS if key in target and key != "boxes"}
        for (img, tgt), (left, top) in zip(samples, [(0, 0), (cell_w, 0), (0, cell_h), (cell_w, cell_h)]):
            canvas[top:top + img.shape[0], left:left + img.shape[1]] = img
            boxes.append(tgt["boxes"] + np.array([left, top, left, top], np.float32))
            for key in per_box:
                per_box[key].append(np.asarray(tgt[key]))

        height, width = canvas.shape[:2]
        matrix = self.draw_affine(width, height)
        canvas = cv2.warpAffine(canvas, matrix, (width, height), flags=cv2.INTER_NEAREST,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(self.fill_value,) * 3)
        merged = transform_boxes(np.concatenate(boxes), matrix, width, height)
        sizes = merged[:, 2:] - merged[:, :2]
        keep = (sizes >= self.min_size).all(axis=1)
        out = dict(target)  # image_id and orig_size stay those of the sample being augmented
        out["boxes"] = merged[keep]
        for key, values in per_box.items():
            out[key] = np.concatenate(values)[keep]
        if "area" in out:  # the annotated areas no longer describe the moved boxes
            out["area"] = (sizes[keep, 0] * sizes[keep, 1]).astype(np.float32)
        return canvas, out

    def __repr__(self) -> str:
        return (f"Mosaic(output_size={self.resize.size}, rotation={self.rotation_range}, "
                f"translate={self.translation_range}, scale={self.scaling_range}, fill={self.fill_value})")


