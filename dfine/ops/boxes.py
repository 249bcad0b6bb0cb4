"""Box conversions and overlap measures: the single copy used by models, losses, data and evaluation.

Formats: ``cxcywh`` is (centre x, centre y, width, height); ``xyxy`` is (x1, y1, x2, y2).
All functions take tensors whose last dimension is 4 and keep every leading dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy. Negative sizes are clamped to 0, as the reference does."""
    cx, cy, w, h = boxes.unbind(-1)
    half_w = 0.5 * w.clamp(min=0.0)
    half_h = 0.5 * h.clamp(min=0.0)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] (x1, y1, width, height), COCO's ``bbox`` layout."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...] areas."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of [..., N, 4] and [..., M, 4] xyxy boxes -> ([..., N, M], [..., N, M]); the
    leading dimensions broadcast (one image: [N, 4] and [M, 4] -> [N, M])."""
    area1 = box_area(boxes1)[..., :, None]
    area2 = box_area(boxes2)[..., None, :]
    a, b = boxes1[..., :, None, :], boxes2[..., None, :, :]
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, check: bool = True) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al., 2019) of [..., N, 4] and [..., M, 4] xyxy boxes ->
    [..., N, M]; the leading dimensions broadcast.

    With ``check``, raises ValueError on inverted boxes, which would otherwise give inf/NaN silently. The
    matcher passes ``check=False``: its boxes come from ``box_cxcywh_to_xyxy`` (never inverted), a NaN prediction
    must reach its NaN handling rather than fail here, and the check would cost a device synchronisation.
    """
    if check and (not (boxes1[..., 2:] >= boxes1[..., :2]).all() or not (boxes2[..., 2:] >= boxes2[..., :2]).all()):
        raise ValueError("generalized_box_iou needs xyxy boxes with x2 >= x1 and y2 >= y1 (got an inverted box)")
    iou, union = box_iou(boxes1, boxes2)
    a, b = boxes1[..., :, None, :], boxes2[..., None, :, :]
    wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matching rows of two [N, 4] xyxy box sets -> [N] (the diagonal of box_iou, without the N x M matrix)."""
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (box_area(boxes1) + box_area(boxes2) - inter)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both terms to at least eps, as the reference does."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of matching rows of two [N, 4] xyxy box sets -> [N] (the diagonal of generalized_box_iou,
    without the N x M matrix). Boxes are assumed non-inverted, as produced by box_cxcywh_to_xyxy."""
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    outer_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    enclosing = outer_wh[:, 0] * outer_wh[:, 1]
    return inter / union - (enclosing - union) / enclosing
