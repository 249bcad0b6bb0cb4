"""Fine-grained Distribution Refinement (FDR) math, shared by the D-FINE decoder and its losses.

FDR (D-FINE, arXiv 2410.13842, sec. 3.1) predicts, for each of a box's four edges, a probability
distribution over ``reg_max + 1`` bins. The bins are not evenly spaced: the weighting function W(n)
puts fine steps near zero (small corrections) and coarse ones at the ends (large corrections).
An edge offset is the expectation of W under the distribution, measured in units of the reference
box size divided by ``reg_scale``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfine.ops.boxes import box_xyxy_to_cxcywh


def weighting_function(reg_max: int, up: Tensor, reg_scale: Tensor | float) -> Tensor:
    """The non-uniform bin values W(0..reg_max) -> [reg_max + 1].

    Args:
        reg_max: number of bin intervals (even).
        up: [1] tensor; the outermost bins sit at +-2 * |up| * |reg_scale|.
        reg_scale: curvature; larger values flatten W near its centre W(reg_max / 2) = 0.
    """
    up = up.reshape(-1)[:1]
    reg_scale = torch.as_tensor(reg_scale, device=up.device).abs()
    inner_bound = up.abs() * reg_scale
    outer_bound = inner_bound * 2
    step = (inner_bound + 1) ** (2 / (reg_max - 2))
    half = reg_max // 2
    # Geometric growth step**i - 1 for i = 1 .. half-1, mirrored to the left of zero.
    right = torch.cat([step**i - 1 for i in range(1, half)]) if half > 1 else up.new_zeros(0)
    left = -right.flip(0)
    return torch.cat([-outer_bound, left, torch.zeros_like(up), right, outer_bound])


def distance2bbox(points: Tensor, distance: Tensor, reg_scale: Tensor | float) -> Tensor:
    """Decode edge offsets into boxes.

    Args:
        points: [..., 4] reference boxes cxcywh.
        distance: [..., 4] offsets of the (left, top, right, bottom) edges in units of size / reg_scale,
            measured from the edges of a box half the reference size.
        reg_scale: scalar.
    Returns:
        [..., 4] boxes cxcywh.
    """
    reg_scale = abs(reg_scale)
    cx, cy, w, h = points.unbind(-1)
    x1 = cx - (0.5 * reg_scale + distance[..., 0]) * (w / reg_scale)
    y1 = cy - (0.5 * reg_scale + distance[..., 1]) * (h / reg_scale)
    x2 = cx + (0.5 * reg_scale + distance[..., 2]) * (w / reg_scale)
    y2 = cy + (0.5 * reg_scale + distance[..., 3]) * (h / reg_scale)
    return box_xyxy_to_cxcywh(torch.stack([x1, y1, x2, y2], -1))


def translate_gt(gt: Tensor, reg_max: int, reg_scale: Tensor | float, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Spread continuous edge offsets over their two neighbouring bins of W.

    Args:
        gt: any shape, offsets in W's units; flattened to [N].
    Returns:
        (left_bin [N] float, weight_right [N], weight_left [N]). Offsets below W(0) go wholly to bin 0;
        offsets at or above W(reg_max) to the right bin with left_bin = reg_max - 0.1, as the reference.
    """
    gt = gt.reshape(-1)
    values = weighting_function(reg_max, up, reg_scale)
    left_bin = ((values.unsqueeze(0) - gt.unsqueeze(1)) <= 0).sum(dim=1).float() - 1

    weight_right = torch.zeros_like(left_bin)
    weight_left = torch.zeros_like(left_bin)
    inside = (left_bin >= 0) & (left_bin < reg_max)
    idx = left_bin[inside].long()
    to_left = (gt[inside] - values[idx]).abs()
    to_right = (values[idx + 1] - gt[inside]).abs()
    weight_right[inside] = to_left / (to_left + to_right)
    weight_left[inside] = 1.0 - weight_right[inside]

    below = left_bin < 0
    weight_left[below] = 1.0
    left_bin[below] = 0.0
    above = left_bin >= reg_max
    weight_right[above] = 1.0
    left_bin[above] = reg_max - 0.1
    return left_bin, weight_right, weight_left


def bbox2distance(
    points: Tensor, bbox: Tensor, reg_max: int, reg_scale: Tensor | float, up: Tensor, eps: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """Encode target boxes as FDR bin targets relative to reference boxes (the inverse of distance2bbox).

    Args:
        points: [N, 4] reference boxes cxcywh.
        bbox: [N, 4] target boxes xyxy.
    Returns:
        (target_bins [N*4] in [0, reg_max - eps], weight_right [N*4], weight_left [N*4]), all detached.
    """
    reg_scale = abs(reg_scale)
    unit_w = points[:, 2] / reg_scale + 1e-16
    unit_h = points[:, 3] / reg_scale + 1e-16
    left = (points[:, 0] - bbox[:, 0]) / unit_w - 0.5 * reg_scale
    top = (points[:, 1] - bbox[:, 1]) / unit_h - 0.5 * reg_scale
    right = (bbox[:, 2] - points[:, 0]) / unit_w - 0.5 * reg_scale
    bottom = (bbox[:, 3] - points[:, 1]) / unit_h - 0.5 * reg_scale
    offsets = torch.stack([left, top, right, bottom], -1)
    target_bins, weight_right, weight_left = translate_gt(offsets, reg_max, reg_scale, up)
    target_bins = target_bins.clamp(min=0, max=reg_max - eps)
    return target_bins.reshape(-1).detach(), weight_right.detach(), weight_left.detach()
