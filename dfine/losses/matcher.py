"""One-to-one assignment of predictions to targets (Hungarian matching), the GO-LSD union of assignments across
decoder layers, and the fixed assignment of contrastive denoising queries.

An assignment for a batch is a list with one ``(query_idx, target_idx)`` pair of int64 CPU tensors per image,
of equal length min(Q, N_i): query ``query_idx[k]`` is matched to target ``target_idx[k]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from dfine.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from dfine.registry import MATCHERS

Assignment = list[tuple[Tensor, Tensor]]


def _empty_pair() -> tuple[Tensor, Tensor]:
    return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)


@MATCHERS.register
class HungarianMatcher(nn.Module):
    """Minimum-cost one-to-one matching of queries to targets, per image (DETR, Carion et al., 2020).

    cost = cost_class * class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU). With ``use_focal_loss`` the
    class cost is the focal loss of matching minus that of not matching (sigmoid scores), otherwise minus the
    softmax probability of the target class.

    Args:
        weight_dict: {"cost_class": w, "cost_bbox": w, "cost_giou": w}.
        use_focal_loss: sigmoid/focal class cost (D-FINE, RT-DETR) instead of softmax.
        alpha, gamma: focal cost parameters.
    """

    def __init__(self, weight_dict: dict, use_focal_loss: bool = False, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        missing = {"cost_class", "cost_bbox", "cost_giou"} - set(weight_dict)
        if missing:
            raise ValueError(f"HungarianMatcher weight_dict is missing {sorted(missing)} (it needs cost_class, "
                             f"cost_bbox and cost_giou)")
        self.cost_class = float(weight_dict["cost_class"])
        self.cost_bbox = float(weight_dict["cost_bbox"])
        self.cost_giou = float(weight_dict["cost_giou"])
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        self.use_focal_loss = use_focal_loss
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Assignment:
        """Match one set of predictions.

        Args:
            outputs: {"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4] cxcywh}.
            targets: B dicts {"labels": [N_i] long, "boxes": [N_i, 4] cxcywh}.
        Returns:
            B pairs (query_idx [K_i], target_idx [K_i]), int64 on the CPU, K_i = min(Q, N_i).
        """
        return self.match_many([outputs], targets)[0]

    @torch.no_grad()
    def match_many(self, outputs_list: list[dict], targets: list[dict]) -> list[Assignment]:
        """Match several sets of predictions (decoder layers) against the same targets.

        Sets with the same query count are costed together and copied to the CPU in one transfer, which saves a
        device synchronisation per decoder layer. Returns one assignment per set, in order.
        """
        results: list[Assignment | None] = [None] * len(outputs_list)
        groups: dict[tuple, list[int]] = {}
        for i, out in enumerate(outputs_list):
            groups.setdefault(tuple(out["pred_logits"].shape), []).append(i)
        for members in groups.values():
            logits = torch.stack([outputs_list[i]["pred_logits"] for i in members])
            boxes = torch.stack([outputs_list[i]["pred_boxes"] for i in members])
            for i, assignment in zip(members, self._match_stacked(logits, boxes, targets)):
                results[i] = assignment
        return results  # type: ignore[return-value]

    def _match_stacked(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> list[Assignment]:
        """logits [L, B, Q, C], boxes [L, B, Q, 4] -> L assignments."""
        num_sets, batch_size = logits.shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher: {len(targets)} target dicts for a batch of {batch_size} images")
        max_targets = max(sizes, default=0)
        if max_targets == 0:
            return [[_empty_pair() for _ in range(batch_size)] for _ in range(num_sets)]

        # Pad each image's targets to max_targets: costs are only computed between an image's own queries and
        # targets (B x Q x N_max rather than the B x Q x sum(N) of a flattened batch); padding is sliced away.
        device = logits.device
        labels = torch.zeros(batch_size, max_targets, dtype=torch.int64, device=device)
        tgt_boxes = torch.zeros(batch_size, max_targets, 4, dtype=boxes.dtype, device=device)
        for b, t in enumerate(targets):
            labels[b, : sizes[b]] = t["labels"].to(device)
            tgt_boxes[b, : sizes[b]] = t["boxes"].to(device=device, dtype=boxes.dtype)
        # Padding boxes must not be degenerate (0/0 in GIoU): give them a unit box.
        pad = torch.arange(max_targets, device=device)[None, :] >= torch.tensor(sizes, device=device)[:, None]
        tgt_boxes[pad] = tgt_boxes.new_tensor([0.5, 0.5, 1.0, 1.0])

        gather_idx = labels[None, :, None, :].expand(num_sets, batch_size, logits.shape[2], max_targets)
        if self.use_focal_loss:
            prob = logits.sigmoid().gather(3, gather_idx)
            neg_cost = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
            pos_cost = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
            class_cost = pos_cost - neg_cost
        else:
            class_cost = -F.softmax(logits, dim=-1).gather(3, gather_idx)
        l1_cost = (boxes[:, :, :, None, :] - tgt_boxes[None, :, None, :, :]).abs().sum(-1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)[None], check=False)
        cost = self.cost_bbox * l1_cost + self.cost_class * class_cost + self.cost_giou * giou_cost
        # NaN costs (from NaN predictions) would make the solver fail; the reference sets them to 1.
        cost = torch.nan_to_num(cost, nan=1.0).float().cpu().numpy()

        assignments = []
        for layer_cost in cost:
            per_image = []
            for b, n in enumerate(sizes):
                if n == 0:
                    per_image.append(_empty_pair())
                    continue
                rows, cols = linear_sum_assignment(layer_cost[b, :, :n])
                per_image.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            assignments.append(per_image)
        return assignments


def union_assignment(assignments: list[Assignment]) -> Assignment:
    """GO-LSD's union of the assignments of several decoder layers, one target per query.

    All (query, target) pairs of all layers are pooled per image; distinct pairs are ranked by how many layers
    chose them (``torch.argsort(counts, descending=True)`` over the lexicographically sorted distinct pairs, the
    reference's tie order), and each query keeps its first pair in that ranking. Queries come out in the order
    in which they first appear in the ranking.

    Args:
        assignments: per layer, the per-image (query_idx, target_idx) pairs; the first is the final layer's.
    Returns:
        per image (query_idx [K], target_idx [K]), int64 CPU, queries unique.
    """
    batch_size = len(assignments[0])
    union = []
    for b in range(batch_size):
        queries = torch.cat([a[b][0].cpu() for a in assignments])
        tgts = torch.cat([a[b][1].cpu() for a in assignments])
        if queries.numel() == 0:
            union.append(_empty_pair())
            continue
        pairs, counts = torch.unique(torch.stack([queries, tgts], 1), return_counts=True, dim=0)
        ranked = pairs[torch.argsort(counts, descending=True)]
        # Keep each query's first pair in the ranking, in ranking order.
        _, first_of_query = np.unique(ranked[:, 0].numpy(), return_index=True)
        keep = torch.as_tensor(np.sort(first_of_query), dtype=torch.int64)
        union.append((ranked[keep, 0].clone(), ranked[keep, 1].clone()))
    return union


def denoising_assignment(dn_meta: dict, targets: list[dict]) -> Assignment:
    """The fixed assignment of contrastive denoising queries: the k-th positive query of an image's group g
    reconstructs target k.

    Args:
        dn_meta: {"dn_positive_idx": B tensors of positive query indices [G * N_i], "dn_num_group": G, ...}.
        targets: B dicts with "labels" [N_i].
    Returns:
        per image (dn_positive_idx[i] [G * N_i], target_idx [G * N_i] = arange(N_i) tiled G times).
    """
    positive_idx, num_groups = dn_meta["dn_positive_idx"], int(dn_meta["dn_num_group"])
    assignment = []
    for b, t in enumerate(targets):
        n = len(t["labels"])
        if n == 0:
            assignment.append(_empty_pair())
            continue
        queries = positive_idx[b].to("cpu", torch.int64)
        tgt_idx = torch.arange(n, dtype=torch.int64).repeat(num_groups)
        if len(queries) != len(tgt_idx):
            raise ValueError(
                f"denoising metadata of image {b} lists {len(queries)} positive queries, but {num_groups} groups of "
                f"{n} targets need {len(tgt_idx)}: dn_meta does not belong to these targets"
            )
        assignment.append((queries, tgt_idx))
    return assignment
