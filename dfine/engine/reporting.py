"""Where evaluation results go: the log (12 COCO numbers and a per-class AP table), TensorBoard and a metrics
JSON that accumulates one entry per epoch."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dfine.evaluation import STAT_NAMES, EvalResult, load_coco_gt

logger = logging.getLogger(__name__)


def dataset_gt_and_labels(dataset, postprocessor) -> tuple[dict, dict | None, list | None]:
    """(COCO ground-truth dict, label -> category id map or None, class names) for a validation dataset.

    Predictions must carry category ids: a postprocessor with ``remap_mscoco_category`` produces them itself;
    otherwise the dataset's ``label_to_category`` maps its contiguous labels back."""
    if getattr(dataset, "ann_file", None) is not None:
        gt = load_coco_gt(dataset.ann_file)
    elif getattr(dataset, "coco", None) is not None:
        gt = load_coco_gt(dataset.coco)
    else:
        raise TypeError(f"{type(dataset).__name__} exposes neither `ann_file` nor `coco`: cannot evaluate it with COCO metrics")
    remaps_itself = bool(getattr(postprocessor, "remap_mscoco_category", False))
    label_to_category = None if remaps_itself else getattr(dataset, "label_to_category", None)
    classes = list(getattr(dataset, "class_names", []) or []) or None
    return gt, label_to_category, classes


def log_eval_result(result: EvalResult, epoch: int | None, writer) -> None:
    where = f"epoch {epoch}" if epoch is not None else "evaluation"
    logger.info(
        "%s: %d images, %d detections (%s)\n%s\nper-class AP:\n%s",
        where, result.num_images, result.num_detections, result.backend, result.summary_table(), result.per_class_table(),
    )
    if writer is not None and epoch is not None:
        for name, value in zip(STAT_NAMES, result.stats):
            writer.add_scalar(f"Test/{name}", value, epoch)
        writer.flush()


class MetricsLog:
    """``metrics.json``: ``{"epochs": [{epoch, phase, train: {...}, eval: {...}}], "best": {...}}``, rewritten
    atomically after every epoch (a resumed run keeps the entries of earlier epochs)."""

    def __init__(self, path: Path, resume: bool):
        self.path = Path(path)
        self.data = {"epochs": [], "best": {}}
        if resume and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                logger.warning("%s is not valid JSON; starting a new one", self.path)

    def add(self, epoch: int, train_stats: dict, result: EvalResult, best: dict, phase: str) -> None:
        self.data["epochs"] = [e for e in self.data["epochs"] if e["epoch"] < epoch]
        self.data["epochs"].append({"epoch": epoch, "phase": phase, "train": train_stats, "eval": result.as_dict()})
        self.data["best"] = dict(best)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
