"""Where evaluation results go: the log (12 COCO numbers and a per-class AP table), TensorBoard and a metrics
JSON that accumulates one entry per epoch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dfine.data.classes import LabelMap
from dfine.evaluation import STAT_NAMES, EvalResult, load_coco_gt
from dfine.utils.files import atomic_write

logger = logging.getLogger(__name__)


def dataset_gt_and_labels(dataset, postprocessor) -> tuple[dict, dict | None, dict]:
    """(COCO ground-truth dict, label -> category id map or None, class description) for a validation dataset.

    Predictions must carry category ids: a postprocessor with ``remap_mscoco_category`` produces them itself;
    otherwise the dataset's ``label_to_category`` maps its contiguous labels back. The class description is
    stored in checkpoints under ``"classes"``: ``{"names": [name per label], "label_to_category": {label: id},
    "remap_mscoco_category": bool}``, so evaluation and inference can map labels back without the dataset."""
    if getattr(dataset, "ann_file", None) is not None:
        gt = load_coco_gt(dataset.ann_file)
    elif getattr(dataset, "coco", None) is not None:
        gt = load_coco_gt(dataset.coco)
    else:
        raise TypeError(f"{type(dataset).__name__} exposes neither `ann_file` nor `coco`: cannot evaluate it with COCO metrics")
    labels = LabelMap.from_dataset(dataset, bool(getattr(postprocessor, "remap_mscoco_category", False)))
    mapping = None if labels.remap_mscoco_category or not labels.label_to_category else labels.label_to_category
    return gt, mapping, labels.to_checkpoint()


def checkpoint_label_map(checkpoint_classes, dataset_map: dict | None, source: str) -> dict | None:
    """The label -> category id map a checkpoint was trained with (its ``"classes"`` entry), which wins over the
    dataset's own when they differ (a warning says so). ``dataset_map`` is returned when the checkpoint has none."""
    trained = LabelMap.from_checkpoint(checkpoint_classes)
    if trained.remap_mscoco_category or not trained.label_to_category:
        return dataset_map
    stored = trained.label_to_category
    if dataset_map is not None and stored != dataset_map:
        logger.warning(
            "%s was trained with label -> category map %s but the validation dataset maps %s; using the "
            "checkpoint's (check that the dataset's categories are the ones the model was trained on)",
            source, stored, dataset_map,
        )
    return stored


def log_eval_result(result: EvalResult, epoch: int | None, writer, step: int | None = None) -> None:
    """The 12 COCO numbers and the per-class table to the log and, with a writer, to TensorBoard (``Test/AP``...,
    ``Test/per_class_AP/<name>``) at ``step`` (default: the epoch)."""
    where = f"epoch {epoch}" if epoch is not None else "evaluation"
    logger.info(
        "%s: %d images, %d detections (%s)\n%s\nper-class AP:\n%s",
        where, result.num_images, result.num_detections, result.backend, result.summary_table(), result.per_class_table(),
    )
    step = epoch if step is None else step
    if writer is not None and step is not None:
        for name, value in zip(STAT_NAMES, result.stats):
            writer.add_scalar(f"Test/{name}", value, step)
        for row in result.per_class:
            if row["ap"] >= 0:  # -1: no ground truth of that class in this set
                writer.add_scalar(f"Test/per_class_AP/{row['name']}", row["ap"], step)
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

    def add(self, epoch: int, train_stats: dict, result: EvalResult, best: dict, phase: str, extra: dict | None = None) -> None:
        """``extra``: more keys of this epoch's entry (e.g. ``unreadable_samples`` with skip_bad_samples)."""
        self.data["epochs"] = [e for e in self.data["epochs"] if e["epoch"] < epoch]
        self.data["epochs"].append({"epoch": epoch, "phase": phase, "train": train_stats, "eval": result.as_dict(), **(extra or {})})
        self.data["best"] = dict(best)
        with atomic_write(self.path, "w") as f:
            f.write(json.dumps(self.data, indent=1))
