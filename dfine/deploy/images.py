"""Reading images and preparing them as model input, for inference and for the export parity check.

Preprocessing is the validation pipeline's: RGB, resized to the model's input size (area averaging when
shrinking, bilinear when enlarging, as ``dfine.data.transforms.Resize``), divided by 255.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor


def load_image(path: str | os.PathLike) -> np.ndarray:
    """[H, W, 3] uint8 RGB; a clear error for unreadable files."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {path} (missing, or not an image format OpenCV reads)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def preprocess(image_rgb: np.ndarray, image_size: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """[H, W, 3] uint8 RGB -> (model input [3, h, w] float in [0, 1], original size (W, H))."""
    import cv2

    height, width = image_rgb.shape[:2]
    new_h, new_w = image_size
    if (new_h, new_w) != (height, width):
        shrink = new_h * new_w < height * width
        image_rgb = cv2.resize(image_rgb, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    tensor = torch.from_numpy(np.ascontiguousarray(image_rgb.transpose(2, 0, 1))).float().div_(255.0)
    return tensor, (width, height)
