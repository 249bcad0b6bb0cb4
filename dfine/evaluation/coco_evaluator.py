"""COCO box evaluation: faster-coco-eval when installed (same numbers, much faster), else pycocotools.

Typical use in the loop::

    evaluator = CocoEvaluator(coco_gt_dict)
    evaluator.update({image_id: {"boxes": [K,4] xyxy pixels, "scores": [K], "labels": [K] category ids}})
    result = evaluator.summarize()          # gathers across ranks first; every rank gets the result
    result.stats                            # the 12 standard COCO numbers (AP, AP50, AP75, APs, APm, APl, AR1, ...)
    result.per_class                        # [{"category_id", "name", "ap", "ap50", "num_gt"}]
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from dfine.ops.boxes import box_xyxy_to_xywh
from dfine.utils.distributed import all_gather_objects

logger = logging.getLogger(__name__)

STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
STAT_DESCRIPTIONS = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)


def coco_backend(name: str = "auto"):
    """(COCO class, COCOeval class, backend name) for ``auto`` / ``faster_coco_eval`` / ``pycocotools``."""
    if name in ("auto", "faster_coco_eval"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            return COCO, COCOeval_faster, "faster_coco_eval"
        except ImportError:
            if name == "faster_coco_eval":
                raise
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval, "pycocotools"


@dataclass
class EvalResult:
    stats: list[float]
    per_class: list[dict] = field(default_factory=list)
    num_images: int = 0
    num_detections: int = 0
    backend: str = ""
    # kept for the visual reports (dfine/evaluation/reports.py): COCOeval's accumulated precision
    # [T, R, K, A, M], its thresholds and category order, and the evaluated records; not written to JSON
    precision: np.ndarray | None = field(default=None, repr=False)
    iou_thrs: list[float] = field(default_factory=list, repr=False)
    rec_thrs: list[float] = field(default_factory=list, repr=False)
    cat_ids: list[int] = field(default_factory=list, repr=False)
    records: list[dict] = field(default_factory=list, repr=False)

    @property
    def ap(self) -> float:
        return self.stats[0]

    def as_dict(self) -> dict:
        return {
            "stats": dict(zip(STAT_NAMES, self.stats)),
            "coco_eval_bbox": list(self.stats),
            "per_class": self.per_class,
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "backend": self.backend,
        }

    def summary_table(self) -> str:
        return "\n".join(f" {d} = {v:0.3f}" for d, v in zip(STAT_DESCRIPTIONS, self.stats))

    def per_class_table(self) -> str:
        if not self.per_class:
            return "(no classes)"
        width = max(8, max(len(str(row["name"])) for row in self.per_class))
        lines = [f"{'id':>4}  {'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'#gt':>6}"]
        for row in self.per_class:
            ap = "   n/a" if row["ap"] < 0 else f"{row['ap']:6.3f}"
            ap50 = "   n/a" if row["ap50"] < 0 else f"{row['ap50']:6.3f}"
            lines.append(f"{row['category_id']:>4}  {str(row['name']):<{width}}  {ap}  {ap50}  {row['num_gt']:>6}")
        return "\n".join(lines)


def load_coco_gt(source) -> dict:
    """The ground-truth dataset dict from a COCO object (either backend), a dict, or a JSON path."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            return json.load(f)
    if isinstance(source, dict):
        return source
    if hasattr(source, "dataset") and isinstance(source.dataset, dict):
        return source.dataset
    raise TypeError(f"cannot read COCO ground truth from {type(source).__name__}: give a dict, a path or a COCO object")


def detections_to_coco(predictions: dict[int, dict]) -> list[dict]:
    """``{image_id: {"boxes" [K,4] xyxy, "scores" [K], "labels" [K]}}`` -> COCO result records (xywh)."""
    records = []
    for image_id, det in predictions.items():
        boxes = torch.as_tensor(det["boxes"]).detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = box_xyxy_to_xywh(boxes).tolist()
        scores = torch.as_tensor(det["scores"]).detach().float().cpu().tolist()
        labels = torch.as_tensor(det["labels"]).detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels):
            records.append({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)})
    return records


class CocoEvaluator:
    """Collects detections (per rank), gathers them and runs COCO box evaluation."""

    def __init__(self, coco_gt, backend: str = "auto"):
        self.gt = load_coco_gt(coco_gt)
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self.predictions: dict[int, list[dict]] = {}

    def update(self, predictions: dict[int, dict]) -> None:
        for image_id, records in _group_by_image(detections_to_coco(predictions), predictions).items():
            # a DistributedSampler pads with repeated images: keep one copy
            self.predictions.setdefault(image_id, records)

    def gather(self) -> dict[int, list[dict]]:
        merged: dict[int, list[dict]] = {}
        for part in all_gather_objects(self.predictions):
            for image_id, records in part.items():
                merged.setdefault(image_id, records)
        return merged

    def summarize(self) -> EvalResult:
        merged = self.gather()
        records = [r for image_id in sorted(merged) for r in merged[image_id]]
        return evaluate_records(self.gt, records, backend=self.backend, num_images=len(merged))


def _group_by_image(records: list[dict], predictions: dict) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {int(i): [] for i in predictions}
    for r in records:
        grouped[r["image_id"]].append(r)
    return grouped


def evaluate_records(gt: dict, records: list[dict], backend: str = "auto", num_images: int | None = None) -> EvalResult:
    """COCO box evaluation of result records against the ground-truth dict; the 12 stats and per-class AP."""
    COCO, COCOeval, name = coco_backend(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _coco_from_dict(COCO, gt)
        dt_dict = {
            "images": copy.deepcopy(gt.get("images", [])),
            "categories": copy.deepcopy(gt.get("categories", [])),
            "annotations": [
                {**r, "id": i + 1, "area": float(r["bbox"][2] * r["bbox"][3]), "iscrowd": 0} for i, r in enumerate(records)
            ],
        }
        coco_dt = _coco_from_dict(COCO, dt_dict)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox") if name == "pycocotools" else COCOeval(
            coco_gt, coco_dt, "bbox", print_function=lambda *a, **k: None
        )
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(s) for s in np.asarray(evaluator.stats)[:12]]
    per_class = per_class_ap(evaluator, gt)
    return EvalResult(
        stats=stats,
        per_class=per_class,
        num_images=len(gt.get("images", [])) if num_images is None else num_images,
        num_detections=len(records),
        backend=name,
        precision=np.asarray(evaluator.eval["precision"]),
        iou_thrs=[float(t) for t in evaluator.params.iouThrs],
        rec_thrs=[float(r) for r in evaluator.params.recThrs],
        cat_ids=[int(c) for c in evaluator.params.catIds],
        records=records,
    )


def _coco_from_dict(COCO, data: dict):
    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    coco.createIndex()
    return coco


def per_class_ap(evaluator, gt: dict) -> list[dict]:
    """AP (IoU .50:.95) and AP50 per category from the accumulated precision array [T, R, K, A, M]
    (area 'all', 100 detections); -1 where a category has no ground truth."""
    precision = np.asarray(evaluator.eval["precision"])
    cat_ids = list(evaluator.params.catIds)
    iou_thrs = np.asarray(evaluator.params.iouThrs)
    i50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt.get("categories", [])}
    num_gt = {c: 0 for c in cat_ids}
    for ann in gt.get("annotations", []):
        if not ann.get("iscrowd", 0) and ann["category_id"] in num_gt:
            num_gt[ann["category_id"]] += 1
    rows = []
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        p50 = precision[i50, :, k, 0, -1]
        valid50 = p50[p50 > -1]
        rows.append(
            {
                "category_id": int(cat_id),
                "name": names.get(cat_id, str(cat_id)),
                "ap": float(valid.mean()) if valid.size else -1.0,
                "ap50": float(valid50.mean()) if valid50.size else -1.0,
                "num_gt": int(num_gt[cat_id]),
            }
        )
    return rows
