"""COCO AP of the PyTorch model and of its exported copy on the same validation images, side by side: the
check that catches an export which runs but has lost accuracy."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

import dfine
from dfine.data.classes import LabelMap
from dfine.deploy.export import compare_detections
from dfine.evaluation import evaluate_records, load_coco_gt
from dfine.ops.boxes import box_xyxy_to_xywh

logger = logging.getLogger(__name__)


@dataclass
class APComparison:
    pytorch_ap: float
    onnx_ap: float
    pytorch_ap50: float
    onnx_ap50: float
    num_images: int
    max_score_diff: float
    max_box_diff: float

    def table(self) -> str:
        return (
            f"{'':<12}{'AP':>8}{'AP50':>8}   ({self.num_images} validation images)\n"
            f"{'pytorch':<12}{self.pytorch_ap:8.4f}{self.pytorch_ap50:8.4f}\n"
            f"{'onnxruntime':<12}{self.onnx_ap:8.4f}{self.onnx_ap50:8.4f}\n"
            f"{'difference':<12}{self.onnx_ap - self.pytorch_ap:+8.4f}{self.onnx_ap50 - self.pytorch_ap50:+8.4f}"
        )


def _label_map(cfg: dict, dataset) -> LabelMap:
    """Deploy outputs carry labels 0..C-1; the ground truth is in category ids."""
    return LabelMap.coco() if cfg.get("remap_mscoco_category") else LabelMap.from_dataset(dataset)


def _records(image_ids, outputs, label_map: LabelMap) -> list[dict]:
    labels, boxes, scores = (torch.as_tensor(x) for x in outputs)
    records = []
    for b, image_id in enumerate(image_ids):
        xywh = box_xyxy_to_xywh(boxes[b]).tolist()
        for label, box, score in zip(labels[b].tolist(), xywh, scores[b].tolist()):
            records.append({"image_id": image_id, "category_id": label_map.category_id(label), "bbox": box, "score": score})
    return records


def compare_ap(cfg: dict, deploy_model, onnx_detector, max_images: int | None = None) -> APComparison:
    """Evaluate ``deploy_model`` (PyTorch, deploy form) and ``onnx_detector`` on the validation set of ``cfg``
    (the first ``max_images`` images when given) with the same COCO evaluator."""
    loader = dfine.build_dataloader(cfg, "val")
    dataset = loader.dataset
    if getattr(dataset, "ann_file", None) is None:
        raise ValueError(f"the validation dataset {type(dataset).__name__} has no COCO annotation file to evaluate against")
    gt = load_coco_gt(dataset.ann_file)
    label_map = _label_map(cfg, dataset)
    torch_records, onnx_records, seen = [], [], []
    max_score, max_box = 0.0, 0.0
    with torch.no_grad():
        total = len(loader)
        if max_images:
            per_batch = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1
            total = min(total, -(-max_images // per_batch))
        progress = tqdm(total=total, desc="AP check", unit="batch")
        for images, targets in loader:
            ids = [int(t["image_id"].reshape(-1)[0]) for t in targets]
            sizes = torch.stack([t["orig_size"] for t in targets]).to(torch.int64)
            ours = deploy_model(images, sizes)
            theirs = onnx_detector(images, sizes)
            parity = compare_detections(ours, theirs)
            max_score, max_box = max(max_score, parity.score_diff), max(max_box, parity.box_diff)
            torch_records += _records(ids, ours, label_map)
            onnx_records += _records(ids, theirs, label_map)
            seen += ids
            progress.update()
            if max_images and len(seen) >= max_images:
                break
        progress.close()
    subset = {**gt, "images": [im for im in gt["images"] if im["id"] in set(seen)]}
    subset["annotations"] = [a for a in gt.get("annotations", []) if a["image_id"] in set(seen)]
    ours_eval = evaluate_records(subset, torch_records)
    theirs_eval = evaluate_records(subset, onnx_records)
    return APComparison(
        pytorch_ap=ours_eval.stats[0], onnx_ap=theirs_eval.stats[0], pytorch_ap50=ours_eval.stats[1],
        onnx_ap50=theirs_eval.stats[1], num_images=len(seen), max_score_diff=max_score, max_box_diff=max_box,
    )
