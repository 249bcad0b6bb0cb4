"""Contrastive denoising queries (DN-DETR / DINO), as used by RT-DETR and D-FINE during training.

Ground-truth boxes are copied into ``num_group`` groups. Each group holds a positive copy of every box
(small noise: it should be reconstructed) and a negative copy (larger noise: it should be rejected), and
some labels are flipped to random classes. These queries run through the decoder beside the ordinary
ones; an attention mask keeps the ordinary queries from seeing them and the groups from seeing each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from dfine.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


class DenoisingGroup(NamedTuple):
    """Inputs the decoder prepends to its queries, and the bookkeeping the criterion needs.

    content: [B, num_dn, hidden] embedded (noised) labels; num_dn is 0 when no image has a target.
    boxes_unact: [B, num_dn, 4] noised boxes in logit space.
    attn_mask: [num_dn + num_queries, num_dn + num_queries] bool, True where attention is blocked; None when
        num_dn is 0 (nothing to hide).
    meta: ``dn_positive_idx`` (per image, the positive query indices [num_group * N_i]),
        ``dn_num_group``, ``dn_num_split`` = [num_dn, num_queries].
    """

    content: Tensor
    boxes_unact: Tensor
    attn_mask: Tensor | None
    meta: dict


def denoising_attention_mask(num_dn: int, group_size: int, num_queries: int, device=None) -> Tensor:
    """[num_dn + num_queries]^2 bool mask, True = blocked: ordinary queries see no denoising query, and a
    denoising query sees only its own group (``group_size`` consecutive queries) and the ordinary queries."""
    size = num_dn + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    group = torch.arange(num_dn, device=device) // group_size
    mask[:num_dn, :num_dn] = group[:, None] != group[None, :]
    return mask


def contrastive_denoising_group(
    targets: list[dict],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
    mirror_negative_sizes: bool = True,
) -> DenoisingGroup | None:
    """Build the noised queries for one batch.

    Args:
        targets: per image ``labels`` [N_i] int and ``boxes`` [N_i, 4] normalised cxcywh.
        class_embed: [num_classes + 1, hidden] embedding; index num_classes pads images with fewer boxes.
        num_denoising: budget of denoising queries; the group count is num_denoising // max(N_i).
        label_noise_ratio: a label is replaced by a random class with probability label_noise_ratio / 2.
        box_noise_scale: edges move by up to this times half the box size (negatives by 1 to 2 times).
        mirror_negative_sizes: when noise pushes an edge past its partner, D-FINE flips the sign of the
            negative width/height (True); RT-DETRv2 keeps it, so the logit clamps it to the smallest size (False).
    Returns:
        None when num_denoising <= 0. When no image has a target, a group of zero queries: the reference skips
        denoising then, but under DDP every rank must produce the same loss terms and give every parameter a
        gradient, so the empty group still runs through the class embedding and the decoder.

    Random numbers are drawn in the reference's order (label mask, new labels, signs, magnitudes), so a
    seeded call reproduces the reference's group.
    """
    if num_denoising <= 0:
        return None
    counts = [len(t["labels"]) for t in targets]
    max_count = max(counts) if counts else 0
    device = targets[0]["labels"].device if targets else class_embed.weight.device
    batch = len(targets)
    if max_count == 0:
        no_labels = torch.zeros([batch, 0], dtype=torch.int64, device=device)
        meta = {
            "dn_positive_idx": tuple(torch.zeros(0, dtype=torch.int64, device=device) for _ in targets),
            "dn_num_group": 1,  # one empty group keeps the criterion's normaliser num_boxes * groups >= 1
            "dn_num_split": [0, num_queries],
        }
        content = class_embed(no_labels)
        return DenoisingGroup(content, content.new_zeros([batch, 0, 4]), None, meta)

    num_group = max(num_denoising // max_count, 1)

    labels = torch.full([batch, max_count], num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros([batch, max_count, 4], device=device)
    is_real = torch.zeros([batch, max_count], dtype=torch.bool, device=device)
    for i, (target, count) in enumerate(zip(targets, counts)):
        if count:
            labels[i, :count] = target["labels"]
            boxes[i, :count] = target["boxes"]
            is_real[i, :count] = True

    # Layout per group: [positives (max_count), negatives (max_count)], groups one after another.
    labels = labels.tile([1, 2 * num_group])
    boxes = boxes.tile([1, 2 * num_group, 1])
    is_real = is_real.tile([1, 2 * num_group])
    is_negative = torch.zeros([batch, 2 * max_count, 1], device=device)
    is_negative[:, max_count:] = 1
    is_negative = is_negative.tile([1, num_group, 1])

    positive = (1 - is_negative.squeeze(-1)) * is_real
    positive_idx = torch.nonzero(positive)[:, 1].split([n * num_group for n in counts])
    num_dn = 2 * max_count * num_group

    if label_noise_ratio > 0:
        flip = torch.rand_like(labels, dtype=torch.float) < (label_noise_ratio * 0.5)
        random_labels = torch.randint_like(flip, 0, num_classes, dtype=labels.dtype)
        labels = torch.where(flip & is_real, random_labels, labels)

    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(boxes)
        half_size = torch.tile(boxes[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes)
        # Positives move by [0, 1) half-sizes, negatives by [1, 2).
        magnitude = magnitude + is_negative
        corners = (corners + sign * magnitude * half_size).clip(min=0.0, max=1.0)
        boxes = box_xyxy_to_cxcywh(corners)
        if mirror_negative_sizes:
            boxes = boxes.abs()  # an edge pushed past its partner gives a negative size
    boxes_unact = inverse_sigmoid(boxes)

    content = class_embed(labels)
    mask = denoising_attention_mask(num_dn, 2 * max_count, num_queries, device=device)
    meta = {"dn_positive_idx": positive_idx, "dn_num_group": num_group, "dn_num_split": [num_dn, num_queries]}
    return DenoisingGroup(content, boxes_unact, mask, meta)
