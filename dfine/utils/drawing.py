"""The one routine that draws detections on an image, and the colour of each class.

Used by inference (deploy/media.py), the evaluation reports' prediction grid (evaluation/reports.py) and the
demo picture (engine/visualize.py), so boxes look the same everywhere and a drawing fix is made once.
OpenCV is imported on first use: training without pictures does not need it.
"""

from __future__ import annotations

import colorsys

import numpy as np


def class_colour(index: int) -> tuple[int, int, int]:
    """A fixed, well-separated RGB colour per class index (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_boxes(canvas: np.ndarray, boxes, colours, texts=None, thickness: int = 1, font_scale: float = 0.4,
               filled_label: bool = True) -> np.ndarray:
    """Draw xyxy pixel ``boxes`` on ``canvas`` [H, W, 3] uint8 in place and return it.

    Args:
        boxes: K boxes (x1, y1, x2, y2) in pixels of ``canvas``.
        colours: K colours in ``canvas``'s channel order (or one colour for all).
        texts: K labels written above their boxes, or None for bare boxes.
        thickness: line width; the label's stroke too.
        filled_label: the label on a box-coloured patch in black (legible on any background, kept inside the
            image), else the label in the box's colour without a patch (small, for dense grids).
    """
    import cv2

    boxes = list(boxes)
    if isinstance(colours, tuple) and len(colours) == 3 and all(isinstance(c, int) for c in colours):
        colours = [colours] * len(boxes)
    texts = texts if texts is not None else [None] * len(boxes)
    for box, colour, text in zip(boxes, colours, texts):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        if not text:
            continue
        if not filled_label:
            cv2.putText(canvas, text, (x1, max(9, y1 - 2)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, thickness)
            continue
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        top = max(0, y1 - th - base - 2)
        left = max(0, min(x1, canvas.shape[1] - tw - 2))  # keep the label inside the image at the right edge
        cv2.rectangle(canvas, (left, top), (left + tw + 2, top + th + base + 2), colour, -1)
        cv2.putText(canvas, text, (left + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thickness)
    return canvas
