"""The dataset pre-flight check run before the model is built: fatal problems stop the job early, with the file
and annotation at fault named (dfine/data/checks.py does the checking)."""

from __future__ import annotations

import logging

from dfine.data.checks import check_loader_dataset
from dfine.data.coco import DatasetError

logger = logging.getLogger(__name__)


def run_preflight(loaders: dict, num_classes: int | None) -> bool:
    """Check the dataset behind every loader of ``{split: loader}``. Warnings and errors are logged; returns
    False when any split has a fatal problem (the caller stops)."""
    ok = True
    for split, loader in loaders.items():
        if loader is None:
            continue
        dataset = loader.dataset
        if getattr(dataset, "ann_file", None) is None and getattr(dataset, "data_yaml", None) is None:
            logger.warning("%s data: %s has no annotation file; pre-flight check skipped", split, type(dataset).__name__)
            continue
        report = check_loader_dataset(dataset, num_classes)
        report.log(logger)
        try:
            report.raise_if_fatal()
        except DatasetError:
            ok = False
    if not ok:
        logger.error("the dataset pre-flight check found fatal problems (above); fix them and restart")
    return ok
