"""Raw decoder outputs -> detections: scores, class labels and boxes in pixels of the original images."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dfine.data.classes import LabelMap
from dfine.ops.boxes import box_cxcywh_to_xyxy
from dfine.registry import POSTPROCESSORS


@POSTPROCESSORS.register
class DFINEPostProcessor(nn.Module):
    """Keep the ``num_top_queries`` best (query, class) pairs of each image.

    With focal (sigmoid) scores a query can contribute several classes, so the top-k runs over
    queries x classes. Otherwise (softmax with a trailing background class) each query keeps its best class.

    Args:
        num_classes: classes of the logits (without background).
        use_focal_loss: sigmoid scores (D-FINE, RT-DETR); False for softmax + background.
        num_top_queries: detections kept per image.
        remap_mscoco_category: report COCO category ids (1..90) instead of labels 0..79.
    """

    def __init__(
        self,
        num_classes: int = 80,
        use_focal_loss: bool = True,
        num_top_queries: int = 300,
        remap_mscoco_category: bool = False,
    ):
        super().__init__()
        coco = LabelMap.coco()
        if remap_mscoco_category and num_classes != len(coco.label_to_category):
            raise ValueError(
                f"remap_mscoco_category needs the 80 COCO classes, but num_classes is {num_classes}; "
                "set remap_mscoco_category: false for other datasets"
            )
        self.num_classes = num_classes
        self.use_focal_loss = use_focal_loss
        self.num_top_queries = num_top_queries
        self.remap_mscoco_category = remap_mscoco_category
        self.deploy_mode = False
        self.register_buffer("category_ids", coco.lookup_table(), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, use_focal_loss={self.use_focal_loss}, "
            f"num_top_queries={self.num_top_queries}, deploy_mode={self.deploy_mode}"
        )

    def deploy(self) -> "DFINEPostProcessor":
        """Return plain tensors (labels 0..C-1, boxes, scores) instead of a list of dicts, for export."""
        self.eval()
        self.deploy_mode = True
        return self

    def forward(self, outputs: dict, orig_sizes: Tensor):
        """
        Args:
            outputs: ``pred_logits`` [B, Q, C] (C + 1 without focal scores), ``pred_boxes`` [B, Q, 4] cxcywh
                normalised.
            orig_sizes: [B, 2] image sizes as (width, height).
        Returns:
            a list with, per image, ``labels`` [K], ``boxes`` [K, 4] xyxy pixels, ``scores`` [K]; in deploy mode
            the tuple (labels [B, K], boxes [B, K, 4], scores [B, K]).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        scale = orig_sizes.to(boxes.dtype).repeat(1, 2).unsqueeze(1)  # (w, h, w, h)
        boxes = box_cxcywh_to_xyxy(boxes) * scale

        if self.use_focal_loss:
            scores, index = torch.topk(torch.sigmoid(logits).flatten(1), self.num_top_queries, dim=-1)
            labels = index % self.num_classes
            query = index // self.num_classes
        else:
            scores, labels = F.softmax(logits, dim=-1)[..., :-1].max(-1)
            k = min(self.num_top_queries, scores.shape[1])
            scores, query = torch.topk(scores, k, dim=-1)
            labels = labels.gather(1, query)
        boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))

        if self.deploy_mode:
            return labels, boxes, scores
        if self.remap_mscoco_category:
            labels = self.category_ids.to(labels.device)[labels]
        return [{"labels": lab, "boxes": box, "scores": sco} for lab, box, sco in zip(labels, boxes, scores)]
