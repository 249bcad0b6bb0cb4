"""Training and evaluation transforms with the reference's names and semantics, on numpy + OpenCV.

A sample is ``(image, target)``: ``image`` [H, W, 3] uint8 RGB (numpy) until ``ConvertPILImage`` makes it a
float tensor; ``target["boxes"]`` [N, 4] float32 (x1, y1, x2, y2) in pixels until ``ConvertBoxes``. Per-box
fields (PER_BOX_KEYS) are filtered together. OpenCV was chosen over torchvision.transforms.v2 on PIL images
because it is several times faster on the same pipeline (figures: dfine/data/throughput.py, the report of
issue 5); random parameters follow torchvision's algorithms, which the reference uses.

Random draws use Python's ``random`` module, which the DataLoader seeds per worker.
"""

from __future__ import annotations

import logging
import random
from typing import Sequence

import cv2
import numpy as np
import torch

from dfine.registry import TRANSFORMS, ConfigError

logger = logging.getLogger(__name__)

PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")


def _keep_boxes(target: dict, keep: np.ndarray) -> dict:
    for key in PER_BOX_KEYS:
        if key in target:
            target[key] = target[key][keep]
    return target


def _pixel_boxes(target: dict, op: str) -> np.ndarray:
    boxes = target["boxes"]
    if not isinstance(boxes, np.ndarray):
        raise ConfigError(f"transform {op} must come before ConvertBoxes (it needs boxes in pixels)")
    return boxes


# Ops a mosaic replaces: its canvas already zooms out and crops (DEIM skips them when Mosaic fires).
REPLACED_BY_MOSAIC = ("RandomZoomOut", "RandomIoUCrop")


def policy_boundaries(epoch, path: str = "transforms.policy.epoch") -> tuple[int, ...]:
    """The policy's epoch as a tuple: (stop,) or DEIM's (start, flat, stop), checked to be increasing."""
    values = list(epoch) if isinstance(epoch, (list, tuple)) else [epoch]
    if len(values) not in (1, 3) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"`{path}` must be an epoch or a list [start, flat, stop] of epochs, not {epoch!r}")
    if any(v < 0 for v in values) or any(a >= b for a, b in zip(values, values[1:])):
        raise ConfigError(f"`{path}` = {values}: the boundaries [start, flat, stop] must be increasing and >= 0")
    return tuple(values)


@TRANSFORMS.register
class Compose:
    """Apply ``ops`` in order, as the augmentation policy allows at the given epoch.

    ``policy: {name: stop_epoch, epoch: E, ops: [names]}``: the named ops are skipped from epoch E on (the
    no-augmentation phase). With DEIM's ``epoch: [start, flat, stop]`` the named ops are skipped before
    ``start`` and from ``stop`` on; in ``[start, flat)`` each sample gets ``Mosaic`` with probability
    ``mosaic_prob`` (and then no RandomZoomOut / RandomIoUCrop), in ``[flat, stop)`` never. The epoch comes
    with every call, never from state hidden in a worker process.
    """

    def __init__(self, ops: Sequence = (), policy: dict | None = None, mosaic_prob: float = 0.0):
        self.ops = list(ops or [])
        policy = dict(policy or {"name": "default"})
        name = policy.get("name", "default")
        if name not in ("default", "stop_epoch"):
            raise ConfigError(f"transforms.policy.name must be `default` or `stop_epoch`, not {name!r}")
        self.boundaries: tuple[int, ...] = ()
        if name == "stop_epoch":
            if "epoch" not in policy:
                raise ConfigError("transforms.policy with name stop_epoch needs `epoch` (the first epoch without them)")
            self.boundaries = policy_boundaries(policy["epoch"])
            present = {type(op).__name__ for op in self.ops}
            missing = [n for n in policy.get("ops", []) if n not in present]
            if missing:
                logger.warning("transforms.policy.ops names %s, which are not among the transforms", missing)
        if not 0.0 <= float(mosaic_prob) <= 1.0:
            raise ConfigError(f"transforms.mosaic_prob must lie in [0, 1], not {mosaic_prob!r}")
        has_mosaic = any(type(op).__name__ == "Mosaic" for op in self.ops)
        if has_mosaic and len(self.boundaries) != 3:
            raise ConfigError("transforms: a Mosaic op needs `policy: {name: stop_epoch, epoch: [start, flat, stop]}` "
                              "(its window is [start, flat))")
        self.policy = policy
        self.mosaic_prob = float(mosaic_prob)

    def bind(self, dataset) -> None:
        """Give ops that draw extra images (Mosaic) the dataset they come from."""
        for op in self.ops:
            if getattr(op, "needs_dataset", False):
                op.bind(dataset)

    def mosaic_window(self) -> tuple[int, int] | None:
        """[start, flat) epochs in which Mosaic may fire, or None."""
        return tuple(self.boundaries[:2]) if len(self.boundaries) == 3 else None

    def stopped_ops(self, epoch: int) -> set[str]:
        """Names of the ops switched off for every sample at ``epoch``."""
        if not self.boundaries or epoch is None:
            return set()
        named = set(self.policy.get("ops", []))
        if len(self.boundaries) == 1:
            return named if epoch >= self.boundaries[0] else set()
        start, flat, stop = self.boundaries
        if epoch < start or epoch >= stop:
            return named
        return {"Mosaic"} if epoch >= flat else set()

    def ops_for_sample(self, epoch: int) -> set[str]:
        """Names of the ops skipped for one sample: ``stopped_ops`` plus this sample's mosaic draw (one
        ``random.random()`` inside the mosaic window)."""
        skipped = self.stopped_ops(epoch)
        window = self.mosaic_window()
        if window is not None and epoch is not None and window[0] <= epoch < window[1]:
            if random.random() < self.mosaic_prob:
                skipped |= set(REPLACED_BY_MOSAIC)
            else:
                skipped.add("Mosaic")
        return skipped

    def __call__(self, image, target: dict, epoch: int = -1):
        skipped = self.ops_for_sample(epoch)
        for op in self.ops:
            if type(op).__name__ not in skipped:
                image, target = op(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({', '.join(type(op).__name__ for op in self.ops)}; policy={self.policy})"


@TRANSFORMS.register
class RandomPhotometricDistort:
    """Brightness, contrast, saturation and hue jitter and a channel shuffle, each applied with probability p;
    contrast goes before or after saturation/hue at random (torchvision's RandomPhotometricDistort)."""

    def __init__(self, brightness=(0.875, 1.125), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.05, 0.05),
                 p: float = 0.5):
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    @staticmethod
    def _gray(image: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)

    def __call__(self, image: np.ndarray, target: dict):
        draws = [random.random() for _ in range(6)]
        contrast_first = draws[1] < 0.5

        def contrast(img):
            factor = random.uniform(*self.contrast)
            mean = float(self._gray(img).mean())
            return cv2.addWeighted(img, factor, img, 0.0, (1.0 - factor) * mean)

        if draws[0] < self.p:
            image = cv2.addWeighted(image, random.uniform(*self.brightness), image, 0.0, 0.0)
        if draws[2] < self.p and contrast_first:
            image = contrast(image)
        if draws[3] < self.p:
            factor = random.uniform(*self.saturation)
            gray = cv2.cvtColor(self._gray(image), cv2.COLOR_GRAY2RGB)
            image = cv2.addWeighted(image, factor, gray, 1.0 - factor, 0.0)
        if draws[4] < self.p:
            # OpenCV's *_FULL HSV stores hue in 0..255, so a fraction of a turn is a shift of 256 * fraction.
            shift = int(round(random.uniform(*self.hue) * 256)) % 256
            if shift:
                hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
                lut = ((np.arange(256) + shift) % 256).astype(np.uint8)
                hsv[..., 0] = cv2.LUT(hsv[..., 0], lut)
                image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
        if draws[2] < self.p and not contrast_first:
            image = contrast(image)
        if draws[5] < self.p:
            image = np.ascontiguousarray(image[..., random.sample(range(3), 3)])
        return image, target


@TRANSFORMS.register
class RandomZoomOut:
    """With probability p, place the image at a random spot of a canvas ``r`` times larger (r uniform in
    ``side_range``) filled with ``fill``."""

    def __init__(self, fill: int = 0, side_range=(1.0, 4.0), p: float = 0.5):
        if side_range[0] < 1.0 or side_range[0] > side_range[1]:
            raise ConfigError(f"RandomZoomOut.side_range must satisfy 1 <= min <= max, got {side_range}")
        self.fill, self.side_range, self.p = fill, side_range, p

    def __call__(self, image: np.ndarray, target: dict):
        if random.random() >= self.p:
            return image, target
        height, width = image.shape[:2]
        ratio = random.uniform(*self.side_range)
        canvas_w, canvas_h = int(width * ratio), int(height * ratio)
        left = int((canvas_w - width) * random.random())
        top = int((canvas_h - height) * random.random())
        canvas = np.full((canvas_h, canvas_w, 3), self.fill, dtype=image.dtype)
        canvas[top:top + height, left:left + width] = image
        target["boxes"] = _pixel_boxes(target, "RandomZoomOut") + np.array([left, top, left, top], np.float32)
        return canvas, target


@TRANSFORMS.register
class RandomIoUCrop:
    """With probability p, the SSD crop (torchvision's RandomIoUCrop): draw a minimum IoU from
    ``sampler_options`` (1.0 = keep the image) and try up to ``trials`` random crops whose size and aspect lie
    in range, which hold at least one box centre and overlap some such box by that IoU. Boxes whose centre
    falls outside the crop are dropped; the others are clipped to it."""

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, min_aspect_ratio: float = 0.5,
                 max_aspect_ratio: float = 2.0, sampler_options: Sequence[float] | None = None, trials: int = 40,
                 p: float = 1.0):
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect_ratio, self.max_aspect_ratio = min_aspect_ratio, max_aspect_ratio
        self.sampler_options = list(sampler_options or [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
        self.trials, self.p = trials, p

    def find_crop(self, boxes: np.ndarray, width: int, height: int):
        """(left, top, right, bottom, kept-box mask) or None for no crop."""
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        # torchvision loops until it draws 1.0; bounded here so a pathological sample cannot hang a worker
        for _ in range(1000):
            min_iou = random.choice(self.sampler_options)
            if min_iou >= 1.0:
                return None
            for _ in range(self.trials):
                scale_w = self.min_scale + (self.max_scale - self.min_scale) * random.random()
                scale_h = self.min_scale + (self.max_scale - self.min_scale) * random.random()
                new_w, new_h = int(width * scale_w), int(height * scale_h)
                if new_h == 0 or not self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio:
                    continue
                left = int((width - new_w) * random.random())
                top = int((height - new_h) * random.random())
                right, bottom = left + new_w, top + new_h
                if left == right or top == bottom:
                    continue
                inside = ((centres[:, 0] > left) & (centres[:, 0] < right)
                          & (centres[:, 1] > top) & (centres[:, 1] < bottom))
                if not inside.any():
                    continue
                chosen = boxes[inside]
                # not dfine.ops.boxes.box_iou: the pipeline holds numpy boxes here, and a tensor round trip on
                # each of up to 40 attempts would cost more than these five lines
                inter_w = np.clip(np.minimum(chosen[:, 2], right) - np.maximum(chosen[:, 0], left), 0, None)
                inter_h = np.clip(np.minimum(chosen[:, 3], bottom) - np.maximum(chosen[:, 1], top), 0, None)
                inter = inter_w * inter_h
                union = (chosen[:, 2] - chosen[:, 0]) * (chosen[:, 3] - chosen[:, 1]) + new_w * new_h - inter
                if (inter / union).max() < min_iou:
                    continue
                return left, top, right, bottom, inside
        return None

    def __call__(self, image: np.ndarray, target: dict):
        if random.random() >= self.p:
            return image, target
        boxes = _pixel_boxes(target, "RandomIoUCrop")
        height, width = image.shape[:2]
        crop = self.find_crop(boxes, width, height)
        if crop is None:
            return image, target
        left, top, right, bottom, inside = crop
        target = _keep_boxes(target, inside)
        shifted = target["boxes"] - np.array([left, top, left, top], np.float32)
        limits = np.array([right - left, bottom - top] * 2, np.float32)
        target["boxes"] = np.clip(shifted, 0, limits)
        return image[top:bottom, left:right], target


@TRANSFORMS.register
class SanitizeBoundingBoxes:
    """Clip boxes to the image and drop those narrower or lower than ``min_size`` pixels or smaller than
    ``min_area``, with their labels and other per-box fields."""

    def __init__(self, min_size: float = 1.0, min_area: float = 1.0):
        self.min_size, self.min_area = min_size, min_area

    def __call__(self, image: np.ndarray, target: dict):
        height, width = image.shape[:2]
        boxes = np.clip(_pixel_boxes(target, "SanitizeBoundingBoxes"), 0, np.array([width, height] * 2, np.float32))
        sizes = boxes[:, 2:] - boxes[:, :2]
        keep = (sizes >= self.min_size).all(axis=1) & (sizes[:, 0] * sizes[:, 1] >= self.min_area)
        target["boxes"] = boxes
        return image, _keep_boxes(target, keep)


@TRANSFORMS.register
class RandomHorizontalFlip:
    """Mirror image and boxes left-right with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: np.ndarray, target: dict):
        if random.random() >= self.p:
            return image, target
        boxes = _pixel_boxes(target, "RandomHorizontalFlip")
        width = image.shape[1]
        target["boxes"] = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
        return cv2.flip(image, 1), target


@TRANSFORMS.register
class Resize:
    """Resize to ``size`` = [height, width], or with an int, so that the shorter side is ``size``. Shrinking
    uses area averaging (anti-aliased, like PIL's resize in the reference), enlarging bilinear interpolation."""

    def __init__(self, size):
        if isinstance(size, int):
            self.size = size
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            self.size = (int(size[0]), int(size[1]))
        else:
            raise ConfigError(f"Resize.size must be an int or [height, width], got {size!r}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if isinstance(self.size, tuple):
            return self.size
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def __call__(self, image: np.ndarray, target: dict):
        height, width = image.shape[:2]
        new_h, new_w = self.output_size(height, width)
        if (new_h, new_w) != (height, width):
            shrink = new_h * new_w < height * width
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            scale = np.array([new_w / width, new_h / height] * 2, np.float32)
            target["boxes"] = _pixel_boxes(target, "Resize") * scale
        return image, target


@TRANSFORMS.register
class ConvertPILImage:
    """[H, W, 3] uint8 -> [3, H, W] tensor of ``dtype``, divided by 255 when ``scale`` (the model's input)."""

    def __init__(self, dtype: str = "float32", scale: bool = True):
        if not hasattr(torch, str(dtype)):
            raise ConfigError(f"ConvertPILImage.dtype {dtype!r} is not a torch dtype (use float32)")
        self.dtype, self.scale = getattr(torch, dtype), scale

    def __call__(self, image, target: dict):
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        image = image.to(self.dtype)
        if self.scale:
            image = image.div_(255.0)
        return image, target


@TRANSFORMS.register
class ConvertBoxes:
    """Pixel xyxy boxes -> ``fmt`` ('cxcywh' or 'xyxy'), divided by the image size when ``normalize``."""

    def __init__(self, fmt: str = "cxcywh", normalize: bool = True):
        if fmt not in ("cxcywh", "xyxy"):
            raise ConfigError(f"ConvertBoxes.fmt must be 'cxcywh' or 'xyxy', not {fmt!r}")
        self.fmt, self.normalize = fmt, normalize

    def __call__(self, image, target: dict):
        boxes = _pixel_boxes(target, "ConvertBoxes")
        height, width = (image.shape[:2] if isinstance(image, np.ndarray) else image.shape[-2:])
        if self.fmt == "cxcywh":
            boxes = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)
        if self.normalize:
            boxes = boxes / np.array([width, height] * 2, np.float32)
        target["boxes"] = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))
        return image, target
