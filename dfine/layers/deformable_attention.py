"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in the RT-DETRv2 / D-FINE form.

Each query looks at a few points per feature level instead of the whole map. For every head the query
predicts the points' offsets around its reference box and one weight per point (softmax over all points
of all levels); the output is the weighted sum of the values sampled there.

Differences from the original Deformable DETR, as in RT-DETRv2 and D-FINE:
  * the number of points may differ per level (``num_points`` as a list);
  * with box references (cx, cy, w, h) offsets are scaled by the box size, by ``offset_scale`` and by
    1 / (points of that level), so more points spread less;
  * ``method="discrete"`` reads one value cell instead of interpolating bilinearly (an export-friendly
    variant without grid_sample; its offsets are then not trained). As in the reference, the cell is
    trunc(x * W + 0.5): the one whose top-left corner is nearest to the point, so released weights keep
    their meaning.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SAMPLING_METHODS = ("default", "discrete")


def split_value_levels(value: Tensor, spatial_shapes: Sequence[Sequence[int]], num_heads: int) -> list[Tensor]:
    """Cut a flattened multi-level value into per-level, per-head maps.

    Args:
        value: [B, sum(H_l * W_l), C] level-major flattened features.
        spatial_shapes: (H_l, W_l) per level.
    Returns:
        one [B * num_heads, C // num_heads, H_l, W_l] tensor per level, channels-last strided: a head's channels
        at one position are adjacent, which is what grid_sample reads and writes per sampled corner (exactly the
        same values as an NCHW copy, its backward 10% faster on CPU). With B == 1 these are views of ``value``.
    """
    batch, length, channels = value.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    if sum(sizes) != length:
        raise ValueError(f"value has {length} positions but spatial_shapes {list(spatial_shapes)} cover {sum(sizes)}")
    head_dim = channels // num_heads
    per_head = value.reshape(batch, length, num_heads, head_dim).transpose(1, 2)  # [B, heads, L, d]
    return [
        level.reshape(batch * num_heads, int(h), int(w), head_dim).permute(0, 3, 1, 2)
        for level, (h, w) in zip(per_head.split(sizes, dim=2), spatial_shapes)
    ]


def multiscale_deformable_sample(
    value_levels: Sequence[Tensor],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    num_points_list: Sequence[int],
    method: str = "default",
) -> Tensor:
    """Sample every level at its points and take the attention-weighted sum.

    Args:
        value_levels: per level [B * heads, head_dim, H_l, W_l] (see split_value_levels).
        sampling_locations: [B, Lq, heads, sum(num_points_list), 2] as (x, y) in [0, 1] of the map.
        attention_weights: [B, Lq, heads, sum(num_points_list)], already normalised.
        num_points_list: points per level, in level order.
        method: ``default`` (bilinear, zero padding, align_corners=False) or ``discrete`` (nearest cell).
    Returns:
        [B, Lq, heads * head_dim].
    """
    batch, num_queries, num_heads, total_points, _ = sampling_locations.shape
    head_dim = value_levels[0].shape[1]
    # [B * heads, Lq, points, 2], split per level.
    locations = sampling_locations.permute(0, 2, 1, 3, 4).flatten(0, 1)
    if method == "default":
        locations = 2 * locations - 1  # grid_sample's [-1, 1] convention
    samples = []
    for value_l, loc_l, points in zip(value_levels, locations.split(list(num_points_list), dim=2), num_points_list):
        # grid_sample's CPU kernel walks a contiguous grid as one run of points, a vector at a time, but a strided
        # one row by row: rows of 3-6 points here. A contiguous copy computes the same values twice as fast.
        loc_l = loc_l.contiguous()
        if method == "default":
            sampled = F.grid_sample(value_l, loc_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif method == "discrete":
            height, width = value_l.shape[-2:]
            scale = torch.tensor([width, height], device=loc_l.device, dtype=loc_l.dtype)
            cell = (loc_l * scale + 0.5).to(torch.int64)  # see the module docstring
            x = cell[..., 0].clamp(0, width - 1)
            y = cell[..., 1].clamp(0, height - 1)
            flat_index = (y * width + x).reshape(value_l.shape[0], 1, num_queries * points)
            gathered = value_l.flatten(2).gather(2, flat_index.expand(-1, head_dim, -1))
            sampled = gathered.reshape(value_l.shape[0], head_dim, num_queries, points)
        else:
            raise ValueError(f"unknown sampling method `{method}`; use one of {SAMPLING_METHODS}")
        samples.append(sampled)  # [B * heads, head_dim, Lq, points_l]
    weights = attention_weights.permute(0, 2, 1, 3).reshape(batch * num_heads, 1, num_queries, total_points)
    output = (torch.cat(samples, dim=-1) * weights).sum(-1)  # [B * heads, head_dim, Lq]
    return output.reshape(batch, num_heads * head_dim, num_queries).permute(0, 2, 1)


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable cross-attention.

    State-dict entries: ``num_points_scale`` [sum(points)], ``sampling_offsets``, ``attention_weights``
    and, with ``value_proj=True`` (RT-DETRv2), ``value_proj`` and ``output_proj``.

    Args:
        embed_dim: query and value width C.
        num_heads: attention heads (C must divide evenly).
        num_levels: feature levels.
        num_points: points per level, an int or one int per level.
        method: ``default`` (bilinear sampling) or ``discrete`` (nearest cell; offsets frozen).
        offset_scale: offsets of box references are multiplied by this and by the box size.
        value_proj: add the input value and output linear projections (RT-DETRv2); D-FINE has none.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int | Sequence[int] = 4,
        method: str = "default",
        offset_scale: float = 0.5,
        value_proj: bool = False,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if method not in SAMPLING_METHODS:
            raise ValueError(f"unknown sampling method `{method}`; use one of {SAMPLING_METHODS}")
        points = list(num_points) if isinstance(num_points, (list, tuple)) else [int(num_points)] * num_levels
        if len(points) != num_levels:
            raise ValueError(f"num_points {list(points)} must give one count per level ({num_levels} levels)")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points_list = points
        self.method = method
        self.offset_scale = offset_scale
        total = sum(points)
        self.register_buffer(
            "num_points_scale", torch.tensor([1.0 / n for n in points for _ in range(n)], dtype=torch.float32)
        )
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * total * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * total)
        if value_proj:
            self.value_proj = nn.Linear(embed_dim, embed_dim)
            self.output_proj = nn.Linear(embed_dim, embed_dim)
        else:
            self.value_proj = self.output_proj = None
        self._reset_parameters()
        if method == "discrete":
            # Rounding to a cell has no gradient with respect to the offsets.
            self.sampling_offsets.requires_grad_(False)

    def _reset_parameters(self) -> None:
        # Start with head h looking along direction 2*pi*h/heads, point k of a level k steps out.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.cat([torch.arange(1, n + 1) for n in self.num_points_list]).to(torch.float32)
        grid = directions[:, None, :] * steps[None, :, None]  # [heads, points, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        if self.value_proj is not None:
            for layer in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor | Sequence[Tensor],
        spatial_shapes: Sequence[Sequence[int]],
    ) -> Tensor:
        """
        Args:
            query: [B, Lq, C].
            reference_points: [B, Lq, 1 or num_levels, 2 or 4], normalised (x, y) points or (cx, cy, w, h) boxes.
            value: [B, sum(H_l * W_l), C], or (without value_proj) the per-level maps of split_value_levels,
                which a decoder can prepare once for all its layers.
            spatial_shapes: (H_l, W_l) per level.
        Returns:
            [B, Lq, C].
        """
        batch, num_queries = query.shape[:2]
        total = sum(self.num_points_list)
        if isinstance(value, Tensor):
            if self.value_proj is not None:
                value = self.value_proj(value)
            value = split_value_levels(value, spatial_shapes, self.num_heads)
        elif self.value_proj is not None:
            raise ValueError("with value_proj, pass the value as one [B, L, C] tensor")

        offsets = self.sampling_offsets(query).reshape(batch, num_queries, self.num_heads, total, 2)
        weights = self.attention_weights(query).reshape(batch, num_queries, self.num_heads, total).softmax(-1)

        refs = reference_points
        if refs.shape[2] not in (1, self.num_levels):
            raise ValueError(f"reference_points dim 2 must be 1 or num_levels, got shape {list(refs.shape)}")
        if refs.shape[2] > 1:  # one reference per level -> one per point
            refs = refs.repeat_interleave(torch.tensor(self.num_points_list, device=refs.device), dim=2)
        refs = refs[:, :, None]  # [B, Lq, 1, 1 or points, 2|4], broadcast over heads
        if refs.shape[-1] == 2:
            # Offsets are in cells of each point's own level.
            cells = torch.tensor(
                [[w, h] for (h, w), n in zip(spatial_shapes, self.num_points_list) for _ in range(n)],
                dtype=query.dtype,
                device=query.device,
            )
            locations = refs + offsets / cells
        elif refs.shape[-1] == 4:
            scale = self.num_points_scale.to(dtype=query.dtype).unsqueeze(-1) * self.offset_scale
            locations = refs[..., :2] + offsets * scale * refs[..., 2:]
        else:
            raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got {list(reference_points.shape)}")

        output = multiscale_deformable_sample(value, locations, weights, self.num_points_list, self.method)
        return self.output_proj(output) if self.output_proj is not None else output
