"""``data: PATH``: find which dataset layout a folder holds and fill the config's dataset sections from it.

Layouts recognised (first match wins):

* YOLO: PATH is a ``*.yaml`` file, or a folder with ``data.yaml`` / ``dataset.yaml`` (see dfine/data/yolo.py).
* COCO: ``PATH/annotations/instances_{train,val}*.json`` (or ``{train,val}*.json``) with the images in
  ``PATH/<json suffix>`` (``train2017``), ``PATH/images/<json suffix>``, ``PATH/images/<split>`` or ``PATH/<split>``.
* Roboflow COCO export: ``PATH/{train,valid}/_annotations.coco.json`` (``val/`` for ``valid/`` also works; the
  images sit beside the json); ``test/`` is listed when present.

``apply_data_key(cfg)`` replaces the dataset of ``train_dataloader`` and ``val_dataloader`` (type and paths; the
transforms stay) and sets ``num_classes`` from the data. A ``num_classes`` the user wrote (in the config file
given, or as an override) that disagrees with the data is an error naming both numbers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from dfine.data.coco import DatasetError, build_category_map
from dfine.data.yolo import read_data_yaml
from dfine.registry import ConfigError

logger = logging.getLogger(__name__)

YOLO_YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")
ROBOFLOW_JSON = "_annotations.coco.json"
LOADER_OF_SPLIT = {"train": "train_dataloader", "val": "val_dataloader"}


@dataclass
class DataLayout:
    """A detected dataset: ``kind`` ('coco', 'roboflow-coco', 'yolo'), the dataset section of each split
    (``{split: {type, ...paths}}``) and the class names in label order."""

    kind: str
    root: Path
    splits: dict[str, dict] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        lines = [f"data {self.root}: {self.kind} layout, {self.num_classes} classes: {', '.join(self.class_names)}"]
        for split, section in self.splits.items():
            where = ", ".join(f"{k}={v}" for k, v in section.items() if k not in ("type", "remap_mscoco_category"))
            lines.append(f"  {split}: {section['type']}({where})")
        return "\n".join(lines)


def detect_layout(path: str | os.PathLike, remap_mscoco_category: bool = False,
                  category_mapping: str = "auto") -> DataLayout:
    """The layout at ``path``; DatasetError says what was looked for when nothing matches."""
    root = Path(path).expanduser().resolve()
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        return _yolo_layout(root, remap_mscoco_category)
    if not root.is_dir():
        raise DatasetError(f"data: {root} is neither a folder nor a YOLO data.yaml")
    for name in YOLO_YAML_NAMES:
        if (root / name).is_file():
            return _yolo_layout(root / name, remap_mscoco_category)
    if (root / "annotations").is_dir():
        return _coco_layout(root, remap_mscoco_category, category_mapping)
    if (root / "train" / ROBOFLOW_JSON).is_file():
        return _roboflow_layout(root, remap_mscoco_category, category_mapping)
    raise DatasetError(
        f"data: no known dataset layout in {root}: looked for a YOLO data.yaml, COCO annotations/instances_train*.json "
        f"and a Roboflow export train/{ROBOFLOW_JSON} (see README, 'Train on your own data')"
    )


def _yolo_layout(yaml_path: Path, remap: bool) -> DataLayout:
    spec = read_data_yaml(yaml_path)
    layout = DataLayout("yolo", yaml_path, class_names=list(spec.names))
    for split in spec.sources:
        layout.splits[split] = {"type": "YoloDetection", "data_yaml": str(yaml_path), "split": split,
                                "remap_mscoco_category": remap}
    return layout


def _coco_section(img_folder: Path, ann_file: Path, remap: bool, mapping: str) -> dict:
    return {"type": "CocoDetection", "img_folder": str(img_folder), "ann_file": str(ann_file),
            "remap_mscoco_category": remap, "category_mapping": mapping}


def _coco_layout(root: Path, remap: bool, mapping: str) -> DataLayout:
    layout = DataLayout("coco", root)
    for split in ("train", "val", "test"):
        candidates = sorted((root / "annotations").glob(f"instances_{split}*.json")) or sorted(
            (root / "annotations").glob(f"{split}*.json"))
        if not candidates:
            continue
        if len(candidates) > 1:
            raise DatasetError(f"data: several {split} annotation files in {root / 'annotations'}: "
                               f"{', '.join(c.name for c in candidates)}; keep one or set the paths explicitly")
        ann_file = candidates[0]
        suffix = ann_file.stem.removeprefix("instances_")
        folders = [root / suffix, root / "images" / suffix, root / "images" / split, root / split]
        found = next((f for f in folders if f.is_dir()), None)
        if found is None:
            raise DatasetError(f"data: no image folder for {ann_file}; looked for "
                               + ", ".join(str(f) for f in folders))
        layout.splits[split] = _coco_section(found, ann_file, remap, mapping)
    return _with_coco_classes(layout, root, remap, mapping)


def _roboflow_layout(root: Path, remap: bool, mapping: str) -> DataLayout:
    layout = DataLayout("roboflow-coco", root)
    for split, folders in (("train", ("train",)), ("val", ("valid", "val")), ("test", ("test",))):
        for folder in folders:
            if (root / folder / ROBOFLOW_JSON).is_file():
                layout.splits[split] = _coco_section(root / folder, root / folder / ROBOFLOW_JSON, remap, mapping)
                break
    return _with_coco_classes(layout, root, remap, mapping)


def _with_coco_classes(layout: DataLayout, root: Path, remap: bool, mapping: str) -> DataLayout:
    for split in ("train", "val"):
        if split not in layout.splits:
            raise DatasetError(f"data: {layout.kind} layout in {root} has no {split} split "
                               "(see README, 'Train on your own data', for the expected files)")
    # The class list is read from the validation json (usually far smaller than the training one); the
    # training set's own categories are checked against num_classes when its dataset is built.
    ann_file = Path(layout.splits["val"]["ann_file"])
    try:
        categories = json.loads(ann_file.read_text(encoding="utf-8"))["categories"]
        _, names = build_category_map(categories, remap, mapping)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"data: cannot read the categories of {ann_file}: {err}") from None
    layout.class_names = [names.get(i, "") for i in range(max(names, default=-1) + 1)]
    return layout


_DESCRIPTIONS: dict[str, str] = {}


def apply_data_key(cfg: dict, num_classes_set: bool) -> dict:
    """Fill ``cfg`` in place from ``cfg['data']`` (no-op without it); returns it. ``num_classes_set``: the user
    wrote num_classes, so it must agree with the data instead of being replaced."""
    path = cfg.get("data")
    if not path:
        return cfg
    old_train = ((cfg.get("train_dataloader") or {}).get("dataset") or {})
    mapping = old_train.get("category_mapping", "auto") if old_train.get("type") == "CocoDetection" else "auto"
    try:
        layout = detect_layout(path, bool(cfg.get("remap_mscoco_category")), mapping)
    except DatasetError as err:
        raise ConfigError(str(err)) from None
    missing = [split for split in LOADER_OF_SPLIT if split not in layout.splits]
    if missing:
        raise ConfigError(f"data: {layout.root} ({layout.kind}) has no {' and no '.join(missing)} split; "
                          f"found: {', '.join(layout.splits) or 'none'}")
    if num_classes_set and cfg.get("num_classes") != layout.num_classes:
        raise ConfigError(
            f"num_classes is {cfg.get('num_classes')} but the data at {path} has {layout.num_classes} classes "
            f"({', '.join(layout.class_names)}); remove num_classes (it is read from the data) or fix the data"
        )
    cfg["num_classes"] = layout.num_classes
    for split, loader_key in LOADER_OF_SPLIT.items():
        loader = cfg.setdefault(loader_key, {})
        old = loader.get("dataset") or {}
        loader["dataset"] = {**layout.splits[split], **({"transforms": old["transforms"]} if "transforms" in old else {})}
    _DESCRIPTIONS[str(path)] = layout.describe()
    logger.info("%s", _DESCRIPTIONS[str(path)])
    return cfg


def describe_data(path: str) -> str:
    """The layout summary printed when training starts (detected again if this process did not apply it)."""
    if str(path) not in _DESCRIPTIONS:
        _DESCRIPTIONS[str(path)] = detect_layout(path).describe()
    return _DESCRIPTIONS[str(path)]
