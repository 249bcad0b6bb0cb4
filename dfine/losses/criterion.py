"""The D-FINE training objective: which predictions each loss sees, with which targets and normaliser.

Heads of one training forward and how they are supervised (D-FINE, arXiv 2410.13842):

=============  ==========================  ===================================  ======================
head           outputs key                 classification (VFL) matched by      boxes, FGL, DDF by
=============  ==========================  ===================================  ======================
final layer    (top level)                 its own Hungarian assignment         the union assignment
layer i        ``aux_outputs[i]``          its own assignment                   the union assignment
first layer    ``pre_outputs``             its own assignment                   the union assignment
encoder        ``enc_aux_outputs[i]``      its own assignment                   the union (boxes only)
denoising      ``dn_outputs[i]``           the fixed denoising assignment       the same
=============  ==========================  ===================================  ======================

The union assignment (GO-LSD) pools the matches of all layers, so every layer's localization is trained on
every query that any layer found good. FGL trains each edge's bin distribution; DDF distils the final
layer's distributions into the earlier layers. Loss names follow the reference: ``loss_vfl``,
``loss_bbox``, ``loss_giou``, ``loss_fgl``, ``loss_ddf`` with suffixes ``_aux_{i}``, ``_pre``,
``_enc_{i}``, ``_dn_{i}``, ``_dn_pre``; each value is already multiplied by its weight.

With ``use_union_matching=False`` every head uses its own assignment for every loss, which is RT-DETRv2's
objective (losses ``[vfl, boxes]``; its denoising heads come as ``dn_aux_outputs``).

DEIM (arXiv 2412.04234) trains the same heads with ``losses: [mal, boxes, local]``: the matchability-aware
loss replaces VFL (terms ``loss_mal`` with the same suffixes); everything else is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from dfine.losses import functional as L
from dfine.losses.matcher import Assignment, denoising_assignment, union_assignment
from dfine.models.fdr import bbox2distance
from dfine.ops.boxes import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou
from dfine.registry import CRITERIONS, ConfigError

# Loss group names accepted in ``losses`` and the weighted terms each one produces.
LOSS_TERMS = {
    "vfl": ("loss_vfl",),
    "mal": ("loss_mal",),
    "focal": ("loss_focal",),
    "boxes": ("loss_bbox", "loss_giou"),
    "local": ("loss_fgl", "loss_ddf"),
}

# The reference normalises the DDF mixing weights to a per-device batch of 8 images.
DDF_REFERENCE_BATCH = 8


@dataclass
class Matched:
    """Flat view of an assignment with its targets gathered once, shared by every head that uses it."""

    batch_idx: Tensor  # [M] long, on the predictions' device
    query_idx: Tensor  # [M] long
    labels: Tensor  # [M] long
    boxes: Tensor  # [M, 4] cxcywh

    @property
    def count(self) -> int:
        return self.batch_idx.numel()


def gather_matched(assignment: Assignment, targets: list[dict], device: torch.device) -> Matched:
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(assignment)]).to(device)
    query_idx = torch.cat([q for q, _ in assignment]).to(device)
    labels = torch.cat([t["labels"].to(device)[j.to(device)] for t, (_, j) in zip(targets, assignment)])
    boxes = torch.cat([t["boxes"].to(device)[j.to(device)] for t, (_, j) in zip(targets, assignment)])
    return Matched(batch_idx, query_idx, labels.long(), boxes.float())


@dataclass
class Head:
    """One set of predictions and how to supervise it."""

    suffix: str
    outputs: dict
    classification: Matched
    localization: Matched
    num_classification: float
    num_localization: float
    group: str  # heads of one group share FGL targets and DDF mixing weights ("match" or "denoising")


def average_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over all ranks (one all_reduce, run on every rank), clamped to at least 1."""
    t = torch.tensor(values, dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t.clamp(min=1).tolist()


@CRITERIONS.register
class DFINECriterion(nn.Module):
    """D-FINE's loss: VFL, L1, GIoU, FGL and DDF over the final, intermediate, first, encoder and denoising heads.

    Args:
        matcher: a HungarianMatcher (built by the builder from ``criterion.matcher``).
        weight_dict: {term name: weight}; a term absent here is neither computed nor reported.
        losses: loss groups to apply, from "vfl", "mal", "focal", "boxes", "local".
        alpha, gamma: VFL / focal parameters; ``gamma`` is also MAL's exponent (DEIM uses 1.5).
        mal_alpha: optional factor on MAL's negative weight (DEIM's ``mal_alpha``; null = 1).
        num_classes: number of classes of ``pred_logits``.
        reg_max: FDR bins per edge minus one.
        boxes_weight_format: None, "iou" or "giou": if set, VFL's targets and the GIoU loss's per-box weights are
            the (G)IoU of the matched boxes.
        share_matched_indices: without union matching, intermediate layers reuse the final layer's assignment.
        use_union_matching: GO-LSD union assignment for localization (D-FINE); False gives RT-DETRv2's objective.
        ddf_temperature: DDF's softmax temperature.
    """

    def __init__(
        self,
        matcher: nn.Module,
        weight_dict: dict,
        losses: list,
        alpha: float = 0.2,
        gamma: float = 2.0,
        num_classes: int = 80,
        reg_max: int = 32,
        boxes_weight_format: str | None = None,
        share_matched_indices: bool = False,
        use_union_matching: bool = True,
        ddf_temperature: float = 5.0,
        mal_alpha: float | None = None,
    ):
        super().__init__()
        unknown = [name for name in losses if name not in LOSS_TERMS]
        if unknown:
            raise ValueError(f"criterion.losses: unknown loss group(s) {unknown}; known: {list(LOSS_TERMS)}")
        known_terms = {term for name in LOSS_TERMS for term in LOSS_TERMS[name]}
        unknown = [k for k in weight_dict if k not in known_terms]
        if unknown:
            raise ValueError(f"criterion.weight_dict: unknown term(s) {unknown}; known: {sorted(known_terms)}")
        if "mal" in losses and "boxes" not in losses:
            # MAL's targets are the IoUs of the predicted boxes; without the box losses those boxes never learn
            # and the classification targets stay meaningless.
            raise ConfigError(f"criterion.losses: `mal` needs the IoU-providing box losses; add `boxes` "
                              f"(e.g. [mal, boxes, local]), got {list(losses)}")
        if "mal" in losses and "loss_mal" not in weight_dict:
            raise ConfigError("criterion.weight_dict: `losses` has `mal` but no `loss_mal` weight (DEIM uses 1)")
        if boxes_weight_format not in (None, "iou", "giou"):
            raise ValueError(
                f"criterion.boxes_weight_format must be null, 'iou' or 'giou', not {boxes_weight_format!r}"
            )
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.alpha = alpha
        self.gamma = gamma
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.boxes_weight_format = boxes_weight_format
        self.share_matched_indices = share_matched_indices
        self.use_union_matching = use_union_matching
        self.ddf_temperature = ddf_temperature
        self.mal_alpha = mal_alpha

    def forward(self, outputs: dict, targets: list[dict], **metadata) -> dict[str, Tensor]:
        """Weighted loss terms for one training forward.

        Args:
            outputs: the detector's train-mode dict: "pred_logits" [B, Q, C], "pred_boxes" [B, Q, 4] cxcywh and, for
                D-FINE, "pred_corners" [B, Q, 4 * (reg_max + 1)], "ref_points" [B, Q, 4], "up" [1], "reg_scale" [1];
                optional "aux_outputs" (list, each with "teacher_corners", "teacher_logits" too), "pre_outputs",
                "enc_aux_outputs" + "enc_meta" {"class_agnostic"}, "dn_outputs" (or "dn_aux_outputs"),
                "dn_pre_outputs", "dn_meta" {"dn_positive_idx", "dn_num_group"}. Never modified.
            targets: B dicts {"labels": [N_i] long, "boxes": [N_i, 4] cxcywh normalised}; N_i may be 0.
            metadata: epoch/step information the reference trainer passes; unused.
        Returns:
            {term name: scalar}, the same keys on every call with the same outputs structure.
        """
        self._check_inputs(outputs, targets)
        device = outputs["pred_logits"].device
        aux = list(outputs.get("aux_outputs", []))
        pre = [outputs["pre_outputs"]] if "pre_outputs" in outputs else []
        enc = list(outputs.get("enc_aux_outputs", []))

        decoder_heads = aux + pre
        class_agnostic = bool(outputs.get("enc_meta", {}).get("class_agnostic", False))
        # A class-agnostic encoder head scores one "object" class, so it is matched against class-0 targets (the
        # reference matches it with the real labels, which index past its single logit).
        enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets] if class_agnostic else targets
        to_match = [outputs] + ([] if self.share_matched_indices else decoder_heads)
        if not class_agnostic:
            to_match += enc
        assignments = self.matcher.match_many(to_match, targets)
        if class_agnostic:
            enc_assignments = self.matcher.match_many(enc, enc_targets)
        else:
            enc_assignments = assignments[len(to_match) - len(enc) :]
        main_assignment = assignments[0]
        if self.share_matched_indices:
            layer_assignments = [main_assignment] * len(decoder_heads)
        else:
            layer_assignments = assignments[1 : 1 + len(decoder_heads)]
        all_layers = [main_assignment, *layer_assignments, *enc_assignments]
        union = union_assignment(all_layers) if self.use_union_matching else None

        num_union_local = sum(len(q) for q, _ in union) if union is not None else 0
        num_boxes, num_union = average_over_ranks([sum(len(t["labels"]) for t in targets), num_union_local], device)

        def matched(assignment: Assignment, head_targets: list[dict] = targets) -> Matched:
            return gather_matched(assignment, head_targets, device)

        union_matched = matched(union) if union is not None else None
        main_matched = matched(main_assignment)

        def head(suffix, out, own: Matched) -> Head:
            if union_matched is not None:
                return Head(suffix, out, own, union_matched, num_boxes, num_union, "match")
            return Head(suffix, out, own, own, num_boxes, num_boxes, "match")

        heads = [head("", outputs, main_matched)]
        for i, (out, assignment) in enumerate(zip(aux, layer_assignments)):
            heads.append(head(f"_aux_{i}", out, main_matched if self.share_matched_indices else matched(assignment)))
        if pre:
            heads.append(head("_pre", pre[0], matched(layer_assignments[-1])))
        for i, (out, assignment) in enumerate(zip(enc, enc_assignments)):
            own = matched(assignment, enc_targets)
            enc_head = head(f"_enc_{i}", out, own)
            if union_matched is not None:
                # Encoder boxes learn from the union, but its classification and (absent) FGL from its own matches.
                enc_head.localization = gather_matched(union, enc_targets, device)
            heads.append(enc_head)

        dn_heads = outputs.get("dn_outputs", outputs.get("dn_aux_outputs"))
        if dn_heads is not None:
            if "dn_meta" not in outputs:
                raise KeyError("outputs has denoising heads but no `dn_meta` (the denoising group's layout)")
            dn_matched = matched(denoising_assignment(outputs["dn_meta"], targets))
            num_dn = num_boxes * int(outputs["dn_meta"]["dn_num_group"])
            dn_list = [(f"_dn_{i}", out) for i, out in enumerate(dn_heads)]
            if "dn_pre_outputs" in outputs:
                dn_list.append(("_dn_pre", outputs["dn_pre_outputs"]))
            for suffix, out in dn_list:
                heads.append(Head(suffix, out, dn_matched, dn_matched, num_dn, num_dn, "denoising"))

        return self._losses_of_heads(heads, fdr_params=(outputs.get("up"), outputs.get("reg_scale")))

    def _check_inputs(self, outputs: dict, targets: list[dict]) -> None:
        for key in ("pred_logits", "pred_boxes"):
            if key not in outputs:
                raise KeyError(f"criterion: outputs has no `{key}` (got keys {sorted(outputs)})")
        batch_size, _, num_logits = outputs["pred_logits"].shape
        if num_logits != self.num_classes:
            raise ValueError(f"criterion: pred_logits has {num_logits} classes but criterion.num_classes is "
                             f"{self.num_classes}; set num_classes consistently in the config")
        if len(targets) != batch_size:
            raise ValueError(f"criterion: {len(targets)} target dicts for a batch of {batch_size} images")
        for i, t in enumerate(targets):
            if "labels" not in t or "boxes" not in t:
                raise KeyError(f"criterion: target {i} needs `labels` and `boxes` (got {sorted(t)})")
            if t["boxes"].shape != (len(t["labels"]), 4):
                raise ValueError(f"criterion: target {i} has {len(t['labels'])} labels but boxes of shape "
                                 f"{tuple(t['boxes'].shape)} (expected [N, 4] cxcywh)")
        labels = torch.cat([t["labels"].reshape(-1).cpu() for t in targets])
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"criterion: target labels must lie in [0, {self.num_classes}), found "
                             f"{int(labels.min())}..{int(labels.max())}; check the dataset's category mapping")
        if "local" in self.losses and "pred_corners" in outputs:
            for key in ("ref_points", "up", "reg_scale"):
                if key not in outputs:
                    raise KeyError(f"criterion: the `local` losses need outputs[`{key}`] beside `pred_corners`")

    # ------------------------------------------------------------------ losses
    def _losses_of_heads(self, heads: list[Head], fdr_params) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        fgl_targets: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        ddf_mixing: dict[str, tuple[float, float]] = {}
        for h in heads:
            out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in h.outputs.items()}
            for name in self.losses:
                if name == "vfl":
                    terms = self._vfl(out, h)
                elif name == "mal":
                    terms = self._mal(out, h)
                elif name == "focal":
                    terms = self._focal(out, h)
                elif name == "boxes":
                    terms = self._boxes(out, h)
                else:
                    terms = self._local(out, h, fdr_params, fgl_targets, ddf_mixing)
                for key, value in terms.items():
                    losses[key + h.suffix] = value * self.weight_dict[key]
        # The reference's guard: a NaN term becomes 0 (and +-inf the largest finite value) instead of poisoning
        # the step.
        return {k: torch.nan_to_num(v, nan=0.0) for k, v in losses.items()}

    def _box_quality(self, out: dict, m: Matched) -> Tensor | None:
        """The per-box weight of ``boxes_weight_format`` ((G)IoU of detached predictions), or None."""
        if self.boxes_weight_format is None:
            return None
        pred = box_cxcywh_to_xyxy(out["pred_boxes"][m.batch_idx, m.query_idx].detach())
        tgt = box_cxcywh_to_xyxy(m.boxes)
        if self.boxes_weight_format == "iou":
            return elementwise_box_iou(pred, tgt)
        return elementwise_generalized_box_iou(pred, tgt)

    @staticmethod
    def _matched_ious(out: dict, m: Matched) -> Tensor:
        pred = out["pred_boxes"][m.batch_idx, m.query_idx]
        return elementwise_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(m.boxes)).detach()

    def _target_quality(self, out: dict, m: Matched) -> Tensor:
        """[M] the classification target of each matched prediction (VFL and MAL): the box quality when the
        outputs carry one, else the IoU of the matched boxes."""
        quality = self._box_quality(out, m)
        return quality if quality is not None else self._matched_ious(out, m)

    def _vfl(self, out: dict, h: Head) -> dict[str, Tensor]:
        if "loss_vfl" not in self.weight_dict:
            return {}
        m = h.classification
        loss = L.varifocal_loss(out["pred_logits"], m.batch_idx, m.query_idx, m.labels, self._target_quality(out, m),
                                h.num_classification, self.alpha, self.gamma)
        return {"loss_vfl": loss}

    def _mal(self, out: dict, h: Head) -> dict[str, Tensor]:
        m = h.classification
        loss = L.matchability_aware_loss(out["pred_logits"], m.batch_idx, m.query_idx, m.labels, self._target_quality(out, m),
                                         h.num_classification, self.gamma, self.mal_alpha)
        return {"loss_mal": loss}

    def _focal(self, out: dict, h: Head) -> dict[str, Tensor]:
        if "loss_focal" not in self.weight_dict:
            return {}
        m = h.classification
        loss = L.sigmoid_focal_loss(out["pred_logits"], m.batch_idx, m.query_idx, m.labels,
                                    h.num_classification, self.alpha, self.gamma)
        return {"loss_focal": loss}

    def _boxes(self, out: dict, h: Head) -> dict[str, Tensor]:
        m = h.localization
        pred = out["pred_boxes"][m.batch_idx, m.query_idx]
        terms = {}
        if "loss_bbox" in self.weight_dict:
            terms["loss_bbox"] = L.l1_box_loss(pred, m.boxes, h.num_localization)
        if "loss_giou" in self.weight_dict:
            terms["loss_giou"] = L.giou_box_loss(pred, m.boxes, h.num_localization, self._box_quality(out, m))
        return terms

    def _local(self, out: dict, h: Head, fdr_params, fgl_targets: dict, ddf_mixing: dict) -> dict[str, Tensor]:
        """FGL on the matched edges and, for heads with a teacher, DDF on all edges."""
        if "pred_corners" not in out:
            return {}
        m = h.localization
        bins = self.reg_max + 1
        terms = {}
        ious = self._matched_ious(out, m)
        if "loss_fgl" in self.weight_dict:
            if h.group not in fgl_targets:
                # Computed once per group from its first head, as the reference does: every layer of a group shares
                # its reference points, so the bin targets are the same for all of them.
                up, reg_scale = fdr_params
                ref_points = out["ref_points"][m.batch_idx, m.query_idx].detach()
                fgl_targets[h.group] = bbox2distance(
                    ref_points, box_cxcywh_to_xyxy(m.boxes), self.reg_max, reg_scale, up
                )
            corners = out["pred_corners"][m.batch_idx, m.query_idx].reshape(-1, bins)
            terms["loss_fgl"] = L.fine_grained_localization_loss(
                corners, *fgl_targets[h.group], ious, h.num_localization
            )

        if "teacher_corners" in out and "loss_ddf" in self.weight_dict:
            student = out["pred_corners"].reshape(-1, bins)
            teacher = out["teacher_corners"].reshape(-1, bins)
            batch_size, num_queries = out["pred_boxes"].shape[:2]
            if h.group not in ddf_mixing and h.group == "denoising" and "match" in ddf_mixing:
                # The reference mixes the denoising heads' DDF with the matching heads' weights.
                ddf_mixing["denoising"] = ddf_mixing["match"]
            if h.group not in ddf_mixing:
                scale = DDF_REFERENCE_BATCH / batch_size
                num_matched_edges = 4 * m.count
                num_edges = 4 * batch_size * num_queries
                ddf_mixing[h.group] = (math.sqrt(num_matched_edges * scale),
                                       math.sqrt((num_edges - num_matched_edges) * scale))
            if h.outputs["teacher_corners"] is h.outputs["pred_corners"] or torch.equal(student, teacher):
                # The final layer is its own teacher: exactly zero, still connected to the graph.
                terms["loss_ddf"] = student.sum() * 0.0
            else:
                quality = out["teacher_logits"].detach().sigmoid().amax(-1)
                quality = quality.index_put((m.batch_idx, m.query_idx), ious.to(quality.dtype))
                matched_mask = torch.zeros_like(quality, dtype=torch.bool)
                matched_mask[m.batch_idx, m.query_idx] = True
                per_edge = (batch_size, num_queries, 4)
                terms["loss_ddf"] = L.decoupled_distillation_loss(
                    student, teacher,
                    quality[..., None].expand(per_edge).reshape(-1),
                    matched_mask[..., None].expand(per_edge).reshape(-1),
                    *ddf_mixing[h.group], temperature=self.ddf_temperature,
                )
        return terms
