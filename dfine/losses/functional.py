"""Detection losses as pure functions: tensors in, a scalar out, nothing remembered between calls.

Every function divides its sum by ``num_boxes`` (the number of target boxes averaged over ranks), so a
term does not depend on how many images or ranks share a batch. The criterion (dfine/losses/criterion.py)
decides which predictions each function sees.

Abbreviations (D-FINE, arXiv 2410.13842): VFL = varifocal loss (classification with IoU-aware targets),
FGL = fine-grained localization loss (a distribution focal loss on FDR's per-edge bin distributions),
DDF = decoupled distillation focal loss (GO-LSD's self-distillation from the final decoder layer).
MAL = matchability-aware loss (DEIM, arXiv 2412.04234): VFL's successor for dense one-to-one matching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dfine.ops.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou


def _class_targets(logits: Tensor, batch_idx: Tensor, query_idx: Tensor, labels: Tensor, values: Tensor) -> Tensor:
    """[B, Q, C] zeros with ``values`` [M] written at (batch_idx, query_idx, labels)."""
    target = torch.zeros_like(logits)
    target[batch_idx, query_idx, labels] = values.to(logits.dtype)
    return target


def varifocal_loss(
    logits: Tensor,
    batch_idx: Tensor,
    query_idx: Tensor,
    labels: Tensor,
    ious: Tensor,
    num_boxes: float,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> Tensor:
    """Varifocal loss (Zhang et al., VarifocalNet) with IoU-aware classification targets.

    A matched query's target at its label is the IoU of its box with the target box; every other class and
    every unmatched query has target 0. Positives are weighted by that IoU, negatives by
    ``alpha * sigmoid(logit) ** gamma`` (down-weighting easy negatives).

    Args:
        logits: [B, Q, C] class logits.
        batch_idx, query_idx: [M] long, the matched predictions.
        labels: [M] long, their target classes (0 .. C-1).
        ious: [M] IoU of each matched prediction with its target (no gradient flows through it).
        num_boxes: normaliser.
    Returns:
        scalar: sum of the weighted binary cross-entropy over B x Q x C, divided by num_boxes.
    """
    is_positive = _class_targets(logits, batch_idx, query_idx, labels, torch.ones_like(ious))
    score = _class_targets(logits, batch_idx, query_idx, labels, ious.detach())
    weight = alpha * logits.detach().sigmoid().pow(gamma) * (1 - is_positive) + score
    loss = F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="none")
    return loss.sum() / num_boxes


def matchability_aware_loss(
    logits: Tensor,
    batch_idx: Tensor,
    query_idx: Tensor,
    labels: Tensor,
    ious: Tensor,
    num_boxes: float,
    gamma: float = 1.5,
    alpha: float | None = None,
) -> Tensor:
    """Matchability-aware loss (DEIM, arXiv 2412.04234, eq. 3).

    With p = sigmoid(logit) and q the IoU of a matched query's box with its target: the matched (query, label)
    entry has target ``q ** gamma`` and weight 1 (unlike VFL, a low-IoU match is not down-weighted, only its
    target is lowered); every other entry has target 0 and weight ``p ** gamma`` (p detached), times ``alpha``
    when given.

    Args:
        logits: [B, Q, C] class logits.
        batch_idx, query_idx: [M] long, the matched predictions.
        labels: [M] long, their target classes (0 .. C-1).
        ious: [M] IoU of each matched prediction with its target (no gradient flows through it).
        num_boxes: normaliser.
        gamma: exponent of the positive target and of the negative weight.
        alpha: optional factor on the negative weight (DEIM's ``mal_alpha``).
    Returns:
        scalar: sum of the weighted binary cross-entropy over B x Q x C, divided by num_boxes.
    """
    is_positive = _class_targets(logits, batch_idx, query_idx, labels, torch.ones_like(ious))
    target = _class_targets(logits, batch_idx, query_idx, labels, ious.detach().pow(gamma))
    negative_weight = logits.detach().sigmoid().pow(gamma)
    if alpha is not None:
        negative_weight = alpha * negative_weight
    weight = negative_weight * (1 - is_positive) + is_positive
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return loss.sum() / num_boxes


def sigmoid_focal_loss(
    logits: Tensor,
    batch_idx: Tensor,
    query_idx: Tensor,
    labels: Tensor,
    num_boxes: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Focal loss (Lin et al., 2017) on one-hot targets; arguments as varifocal_loss, without IoUs."""
    target = _class_targets(logits, batch_idx, query_idx, labels, torch.ones_like(labels, dtype=logits.dtype))
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target) if alpha >= 0 else 1.0
    return (alpha_t * ce * (1 - p_t) ** gamma).sum() / num_boxes


def l1_box_loss(pred_boxes: Tensor, target_boxes: Tensor, num_boxes: float) -> Tensor:
    """Sum of absolute coordinate differences of [N, 4] matched boxes (cxcywh), divided by num_boxes."""
    return F.l1_loss(pred_boxes, target_boxes, reduction="sum") / num_boxes


def giou_box_loss(pred_boxes: Tensor, target_boxes: Tensor, num_boxes: float, weight: Tensor | None = None) -> Tensor:
    """Sum of (1 - GIoU) of [N, 4] matched boxes (cxcywh), optionally weighted per box [N], divided by num_boxes."""
    loss = 1 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))
    if weight is not None:
        loss = loss * weight
    return loss.sum() / num_boxes


def fine_grained_localization_loss(
    pred_corners: Tensor,
    target_bins: Tensor,
    weight_right: Tensor,
    weight_left: Tensor,
    ious: Tensor,
    num_boxes: float,
) -> Tensor:
    """FGL: distribution focal loss of each edge's bin distribution against its continuous target bin.

    A target lying between bins n and n+1 asks for probability mass on both, in proportion to its closeness
    (weight_left on n, weight_right on n+1; see dfine.models.fdr.bbox2distance). Each box's four edges are
    weighted by the box's IoU with its target, so well-localised boxes refine their distributions most.

    Args:
        pred_corners: [N * 4, reg_max + 1] logits, the edges of N matched boxes in (left, top, right, bottom) order.
        target_bins: [N * 4] float in [0, reg_max); its floor is the left bin.
        weight_right, weight_left: [N * 4].
        ious: [N] per box (no gradient flows through it).
        num_boxes: normaliser.
    Returns:
        scalar.
    """
    log_prob = F.log_softmax(pred_corners, dim=-1)
    left_bin = target_bins.long()
    nll_left = -log_prob.gather(1, left_bin[:, None]).squeeze(1)
    nll_right = -log_prob.gather(1, (left_bin + 1)[:, None]).squeeze(1)
    per_edge = nll_left * weight_left.reshape(-1) + nll_right * weight_right.reshape(-1)
    per_edge = per_edge * ious.detach().repeat_interleave(4)
    return per_edge.sum() / num_boxes


def decoupled_distillation_loss(
    student_corners: Tensor,
    teacher_corners: Tensor,
    weights: Tensor,
    matched: Tensor,
    num_pos: float,
    num_neg: float,
    temperature: float = 5.0,
) -> Tensor:
    """DDF: temperature-scaled KL divergence from the teacher's (final layer's) edge distributions to the student's.

    Each edge's KL(teacher || student) at temperature T is scaled by T**2 (keeping gradients comparable across
    temperatures) and by a localization-quality weight: the IoU for matched predictions, the teacher's top
    class probability otherwise. Matched and unmatched edges are averaged separately and mixed with weights
    ``num_pos`` and ``num_neg``, so the few matched queries are not drowned by the many unmatched ones.

    Args:
        student_corners, teacher_corners: [M, reg_max + 1] logits, one row per edge (M = B * Q * 4).
        weights: [M] per-edge quality weights (no gradient flows through them).
        matched: [M] bool, True for edges of matched predictions.
        num_pos, num_neg: mixing weights of the matched and unmatched means.
        temperature: T.
    Returns:
        scalar; an empty side contributes 0 (still connected to the graph).
    """
    log_student = F.log_softmax(student_corners / temperature, dim=-1)
    teacher = F.softmax(teacher_corners.detach() / temperature, dim=-1)
    kl = F.kl_div(log_student, teacher, reduction="none").sum(-1)
    per_edge = weights.detach() * (temperature**2) * kl
    matched = matched.to(per_edge.dtype)
    # Masked sums instead of boolean indexing: no host sync, and a side with no edges still yields a graph-connected 0.
    pos_mean = (per_edge * matched).sum() / matched.sum().clamp(min=1)
    neg_mean = (per_edge * (1 - matched)).sum() / (1 - matched).sum().clamp(min=1)
    return (pos_mean * num_pos + neg_mean * num_neg) / max(num_pos + num_neg, 1e-12)
