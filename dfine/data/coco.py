"""COCO-format detection dataset: images plus one ``instances`` json, with the category-id mapping made explicit.

Category ids in COCO-format files are often 1-indexed or sparse; the model wants contiguous labels
``0..num_classes-1``. The mapping is chosen once, here, and exposed on the dataset (``category_map``,
``label_to_category``, ``class_names``) so the engine can store it in checkpoints and map predictions back:

* ``remap_mscoco_category: true``: COCO's table (ids 1..90 with gaps -> labels 0..79), dfine/data/coco_categories.py.
* ``category_mapping: auto`` (default otherwise): the json's category ids, sorted, numbered 0..K-1.
* ``category_mapping: identity``: label = category id (the reference's behaviour without remap; needs
  ``num_classes`` > the largest id, e.g. Objects365 with ids 1..365 and ``num_classes: 366``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dfine.data.coco_categories import COCO_CLASS_NAMES, MSCOCO_CATEGORY_TO_LABEL
from dfine.data.sample_access import BAD_SAMPLE_KEY, load_or_substitute, sample_seed, seeded_generators
from dfine.registry import DATASETS, ConfigError

logger = logging.getLogger(__name__)

CATEGORY_MAPPINGS = ("auto", "identity")


class DatasetError(ValueError):
    """A dataset file that cannot be used as it is; the message names the file, image or annotation at fault."""


def build_category_map(
    categories: list[dict], remap_mscoco_category: bool, category_mapping: str = "auto"
) -> tuple[dict[int, int], dict[int, str]]:
    """(category id -> label, label -> class name) for the ``categories`` list of a COCO json."""
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    if remap_mscoco_category:
        unknown = sorted(set(names) - set(MSCOCO_CATEGORY_TO_LABEL))
        if unknown:
            raise DatasetError(
                f"remap_mscoco_category is on but category ids {unknown[:10]} are not COCO ids (1..90); "
                "set remap_mscoco_category: false for custom data (labels are then mapped automatically)"
            )
        return dict(MSCOCO_CATEGORY_TO_LABEL), dict(enumerate(COCO_CLASS_NAMES))
    if category_mapping == "auto":
        ordered = sorted(names)
        return {cat: label for label, cat in enumerate(ordered)}, {i: names[c] for i, c in enumerate(ordered)}
    if category_mapping == "identity":
        if any(cat < 0 for cat in names):
            raise DatasetError("category_mapping: identity needs non-negative category ids")
        return {cat: cat for cat in names}, dict(names)
    raise ConfigError(f"category_mapping must be one of {CATEGORY_MAPPINGS}, not {category_mapping!r}")


def read_image_rgb(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB. EXIF orientation is ignored because COCO boxes refer to the stored pixels."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        hint = "the file is missing" if not path.is_file() else "the file is not a readable image"
        raise DatasetError(f"cannot read image {path}: {hint} (run tools/check_dataset.py on this dataset)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@DATASETS.register
class CocoDetection(Dataset):
    """Images of ``img_folder`` annotated by the COCO json ``ann_file``.

    ``dataset[i]`` is ``(image, target)`` after ``transforms``; with the reference transforms ``image`` is
    float [3, H, W] in [0, 1] and ``target`` holds ``boxes`` [N, 4] (cx, cy, w, h normalised), ``labels`` [N]
    int64, ``image_id`` [1] int64, ``orig_size`` [2] int64 (width, height), ``area`` [N], ``iscrowd`` [N].
    Before ``ConvertBoxes`` boxes are (x1, y1, x2, y2) in pixels. Crowd regions are dropped from training
    targets, as in the reference (the evaluator reads them from the json).

    The loader indexes with ``(index, epoch, step)`` keys; the dataset then also returns ``(epoch, step)`` so
    the augmentation policy and the multi-scale collate see the same epoch in every worker process.
    """

    def __init__(
        self,
        img_folder: str,
        ann_file: str,
        transforms: Any = None,
        return_masks: bool = False,
        remap_mscoco_category: bool = False,
        category_mapping: str = "auto",
    ):
        if return_masks:
            raise ConfigError("CocoDetection: return_masks: true is not supported (detection only); set it to false")
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self._init_state(transforms, remap_mscoco_category, category_mapping)
        if not self.ann_file.is_file():
            raise DatasetError(f"annotation file not found: {self.ann_file} (check `ann_file` in the config)")
        try:
            with open(self.ann_file, encoding="utf-8") as f:
                coco = json.load(f)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{self.ann_file} is not valid json: {err}") from None
        for key in ("images", "annotations", "categories"):
            if key not in coco:
                raise DatasetError(f"{self.ann_file} has no `{key}` list; is it a COCO instances file?")
        self._index(coco)

    def _init_state(self, transforms: Any, remap_mscoco_category: bool, category_mapping: str) -> None:
        """What every dataset built on this class holds besides its annotations (also called by YoloDetection)."""
        self.transforms = transforms
        if hasattr(transforms, "bind"):
            transforms.bind(self)  # ops such as Mosaic draw extra images from this dataset
        self.remap_mscoco_category = bool(remap_mscoco_category)
        self.category_mapping = category_mapping
        self.epoch = -1
        self.sample_seed = 0  # the run's seed, set by the loader builder

    def _index(self, coco: dict) -> None:
        """Category map, sorted image list and per-image annotations from a COCO dict (also used by datasets
        that build the dict in memory from another layout, dfine/data/yolo.py)."""
        self.category_map, self.class_names_by_label = build_category_map(
            coco["categories"], self.remap_mscoco_category, self.category_mapping
        )
        self.label_to_category = {label: cat for cat, label in self.category_map.items()}
        self.images = sorted(coco["images"], key=lambda im: im["id"])
        self._annotations = self._group_annotations(coco["annotations"])

    def _group_annotations(self, annotations: list[dict]) -> dict[int, list[dict]]:
        grouped: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in annotations:
            if ann["category_id"] not in self.category_map:
                raise DatasetError(
                    f"{self.ann_file}: annotation id {ann.get('id')} has category_id {ann['category_id']}, which is "
                    "not in `categories` (run tools/check_dataset.py for the full list)"
                )
            if ann.get("image_id") in grouped:
                grouped[ann["image_id"]].append(ann)
        return grouped

    @property
    def class_names(self) -> list[str]:
        """Class name per label 0..num_labels-1 ('' for labels no category maps to)."""
        return [self.class_names_by_label.get(i, "") for i in range(self.num_labels)]

    @property
    def num_labels(self) -> int:
        """The smallest num_classes that covers every label of this dataset."""
        return max(self.category_map.values(), default=-1) + 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def load_item(self, index: int) -> tuple[np.ndarray, dict]:
        """Untransformed ``(image [H, W, 3] uint8 RGB, target)`` with boxes xyxy in pixels (numpy arrays)."""
        info = self.images[index]
        image = read_image_rgb(self.img_folder / info["file_name"])
        height, width = image.shape[:2]
        return image, self.load_annotations(index, width, height)

    def load_annotations(self, index: int, width: int, height: int) -> dict:
        """Target of image ``index`` (``width`` x ``height`` pixels): boxes xyxy clipped, crowds dropped."""
        info = self.images[index]
        boxes, labels, areas = [], [], []
        for ann in self._annotations[info["id"]]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 > x1 and y2 > y1:
                boxes.append((x1, y1, x2, y2))
                labels.append(self.category_map[ann["category_id"]])
                areas.append(float(ann.get("area", w * h)))
        target = {
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "area": np.asarray(areas, dtype=np.float32),
            "iscrowd": np.zeros(len(labels), dtype=np.int64),
            "image_id": np.asarray([info["id"]], dtype=np.int64),
            "orig_size": np.asarray([width, height], dtype=np.int64),
        }
        return target

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self._transformed(key, self.epoch)
        # from the loader: seeded per sample, an unreadable image replaced and noted (dfine/data/sample_access.py)
        index, epoch, step = key
        with seeded_generators(sample_seed(self.sample_seed, epoch, index)):
            (image, target), notes = load_or_substitute(lambda i: self._transformed(i, epoch), index, len(self), DatasetError)
        if notes:
            target[BAD_SAMPLE_KEY] = notes
        return image, target, (epoch, step)

    def _transformed(self, index: int, epoch: int):
        image, target = self.load_item(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target, epoch=epoch)
        return finalize_sample(image, target)

    def extra_repr(self) -> str:
        return f"img_folder={self.img_folder}, ann_file={self.ann_file}, images={len(self)}"


def finalize_sample(image, target: dict) -> tuple[torch.Tensor, dict]:
    """numpy -> torch for whatever the transforms left as arrays (an image without ConvertPILImage stays uint8)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    out = {}
    for key, value in target.items():
        out[key] = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
    out["boxes"] = out["boxes"].float()
    out["labels"] = out["labels"].long()
    return image, out
