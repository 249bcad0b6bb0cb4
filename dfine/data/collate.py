"""Batching with multi-scale training and DEIM's batch Mixup: one decision per step, the same on every rank."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from dfine.registry import COLLATORS, ConfigError


def generate_scales(base_size: int, base_size_repeat: int) -> list[int]:
    """The reference's scale list: multiples of 32 from 0.75 x base_size up to base_size (exclusive),
    ``base_size`` itself ``base_size_repeat`` times (so it is drawn more often), then multiples of 32 from
    1.25 x base_size down. For 640 and 3: 480..608, 640 x 3, 800..672."""
    low = int(base_size * 0.75 / 32) * 32
    high = int(base_size * 1.25 / 32) * 32
    steps = (base_size - low) // 32
    return [low + 32 * i for i in range(steps)] + [base_size] * base_size_repeat + [high - 32 * i for i in range(steps)]


@COLLATORS.register
class BatchImageCollateFunction:
    """Stack ``(image [3, H, W], target)`` items into ``(images [B, 3, H, W], targets)``.

    Until ``stop_epoch``, with ``base_size_repeat`` set, each batch is resized (``mode`` interpolation, nearest
    as in the reference) to a square size drawn from ``generate_scales(base_size, base_size_repeat)``. The draw
    is a function of (``seed``, epoch, step) only, so every DDP rank picks the same size at the same step;
    boxes are normalised and need no change. (The EMA decay of the no-augmentation phase is the engine's
    ``ema.restart_decay``, not a collate setting.)

    Mixup (DEIM, arXiv 2412.04234): in epochs ``[mixup_epochs[0], mixup_epochs[1])`` a batch is, with
    probability ``mixup_prob``, blended with itself rolled by one image (image i with image i-1) at a ratio
    uniform in [0.45, 0.55]; each image then carries the boxes, labels (and areas) of both. It runs before the
    multi-scale resize and, like it, is decided from (``seed``, epoch, step) only.

    Items coming from the loader carry ``(epoch, step)`` as a third element; items without it use the epoch
    set by ``set_epoch`` and a call counter.
    """

    def __init__(self, base_size: int = 640, base_size_repeat: int | None = None, stop_epoch: int | None = None,
                 seed: int = 0, mode: str = "nearest", mixup_prob: float = 0.0, mixup_epochs: list | None = None):
        if not 0.0 <= float(mixup_prob) <= 1.0:
            raise ConfigError(f"collate_fn.mixup_prob must lie in [0, 1], not {mixup_prob!r}")
        window = list(mixup_epochs) if mixup_epochs is not None else [0, 0]
        if (len(window) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in window)
                or not 0 <= window[0] <= window[1]):
            raise ConfigError(f"collate_fn.mixup_epochs must be [start, stop] epochs with 0 <= start <= stop, "
                              f"not {mixup_epochs!r}")
        self.mixup_prob = float(mixup_prob)
        self.mixup_epochs = tuple(window)
        self.base_size = base_size
        self.scales = generate_scales(base_size, base_size_repeat) if base_size_repeat is not None else None
        self.stop_epoch = stop_epoch if stop_epoch is not None else float("inf")
        self.seed = seed
        self.mode = mode
        self.epoch = -1
        self._calls = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._calls = 0

    def size_for(self, epoch: int, step: int) -> int | None:
        """The square batch size at (epoch, step), or None to keep the transforms' size."""
        if self.scales is None or epoch >= self.stop_epoch:
            return None
        # str seeds hash with SHA-512 in Python's random: identical in every process, unlike hash()
        return random.Random(f"{self.seed}:{epoch}:{step}").choice(self.scales)

    def mixup_for(self, epoch: int, step: int) -> float | None:
        """The blend ratio of the batch at (epoch, step), or None for no mixup."""
        if self.mixup_prob <= 0 or not self.mixup_epochs[0] <= epoch < self.mixup_epochs[1]:
            return None
        rng = random.Random(f"{self.seed}:mixup:{epoch}:{step}")
        if rng.random() >= self.mixup_prob:
            return None
        return round(rng.uniform(0.45, 0.55), 6)

    def __call__(self, items):
        if len(items[0]) == 3:
            epoch, step = items[0][2]
        else:
            epoch, step = self.epoch, self._calls
            self._calls += 1
        shapes = {tuple(item[0].shape) for item in items}
        if len(shapes) > 1:
            raise ConfigError(
                f"images in one batch differ in shape {sorted(shapes)}; add a Resize to the dataset transforms"
            )
        images = torch.stack([item[0] for item in items])
        targets = [item[1] for item in items]
        ratio = self.mixup_for(epoch, step)
        if ratio is not None and len(items) > 1:
            images, targets = mix_batch(images, targets, ratio)
        size = self.size_for(epoch, step)
        if size is not None and images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode=self.mode)
        return images, targets


MIXED_KEYS = ("boxes", "labels", "area", "iscrowd")


def mix_batch(images: torch.Tensor, targets: list[dict], ratio: float) -> tuple[torch.Tensor, list[dict]]:
    """``ratio`` x image i + (1 - ratio) x image i-1 (the batch rolled by one), with both images' per-box fields
    concatenated (its own first). images: [B, 3, H, W] float; targets: B dicts; new dicts, inputs untouched."""
    mixed = images * ratio + images.roll(shifts=1, dims=0) * (1.0 - ratio)
    out = []
    for i, target in enumerate(targets):
        other = targets[i - 1]
        merged = dict(target)
        for key in MIXED_KEYS:
            if key in target and key in other:
                merged[key] = torch.cat([target[key], other[key]], dim=0)
        out.append(merged)
    return mixed, out
