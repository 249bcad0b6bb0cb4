"""YOLO-format detection data, read directly: ``data.yaml`` + ``images/<split>`` + ``labels/<split>/*.txt``.

``data.yaml`` (Ultralytics convention)::

    path: /data/mine          # dataset root; relative: to the yaml's folder (default: the yaml's folder)
    train: images/train       # a folder of images (searched recursively), a .txt list of image paths, or a list
    val: images/val
    test: images/test         # optional
    names: [cat, dog]         # or {0: cat, 1: dog}; `nc` optional and must agree

Each image ``.../images/.../x.jpg`` has its labels in ``.../labels/.../x.txt`` (the last ``images`` folder of
the path becomes ``labels``): one line ``class cx cy w h`` per object, coordinates normalised to [0, 1] by the
image size. An image without a label file has no objects.

``YoloDetection`` builds the COCO dict of a split in memory (category id = label, boxes in pixels from the
image header sizes) and is otherwise a ``CocoDetection``: same targets, transforms, evaluation and checks.
Faulty label lines are skipped by the dataset; the pre-flight check (dfine/data/checks.py) reports each one as
``file:line`` and stops the training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dfine.data.coco import CocoDetection, DatasetError
from dfine.data.coco_categories import MSCOCO_LABEL_TO_CATEGORY
from dfine.registry import DATASETS, ConfigError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")


@dataclass
class YoloSpec:
    """What a data.yaml says: the root, the image sources per split, and the class names (label order)."""

    yaml_path: Path
    root: Path
    names: list[str]
    sources: dict[str, list[Path]] = field(default_factory=dict)


@dataclass
class LabelFault:
    """One bad line (or file) of a YOLO dataset; ``where`` is ``file:line``."""

    kind: str
    fatal: bool
    where: str
    message: str
    hint: str


def read_data_yaml(path: str | os.PathLike) -> YoloSpec:
    """Parse a data.yaml. Raises DatasetError naming the file and key at fault."""
    from dfine.config import safe_load_yaml

    path = Path(path).resolve()
    if not path.is_file():
        raise DatasetError(f"YOLO data file not found: {path}")
    try:
        data = safe_load_yaml(path.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - any parse failure means the same to the user
        raise DatasetError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must hold a mapping with `train`, `val` and `names`")
    names = data.get("names")
    if isinstance(names, dict):
        try:
            keyed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: `names` keys must be the class ids 0..K-1") from None
        if sorted(keyed) != list(range(len(keyed))):
            raise DatasetError(f"{path}: `names` keys must be the class ids 0..{len(keyed) - 1}, found {sorted(keyed)}")
        names = [keyed[i] for i in range(len(keyed))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: `names` must list the class names (a list, or a mapping id -> name)")
    names = [str(n) for n in names]
    if "nc" in data and data["nc"] != len(names):
        raise DatasetError(f"{path}: `nc` is {data['nc']} but `names` has {len(names)} entries; make them agree")
    root = Path(str(data.get("path") or "."))
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    spec = YoloSpec(yaml_path=path, root=root, names=names)
    for split in SPLITS:
        value = data.get(split)
        if value in (None, ""):
            continue
        items = value if isinstance(value, list) else [value]
        spec.sources[split] = [_resolve_source(root, str(item), path, split) for item in items]
    if "train" not in spec.sources:
        raise DatasetError(f"{path}: `train` is missing (a folder of images or a .txt list of image paths)")
    return spec


def _resolve_source(root: Path, item: str, yaml_path: Path, split: str) -> Path:
    candidate = Path(item)
    if not candidate.is_absolute():
        candidate = root / item
        # Roboflow's YOLO exports write `../train/images` although the folder sits beside data.yaml
        if not candidate.exists() and item.startswith("../") and (root / item[3:]).exists():
            candidate = root / item[3:]
    if not candidate.exists():
        raise DatasetError(f"{yaml_path}: `{split}: {item}` -> {candidate} does not exist (relative paths are "
                           f"resolved against `path`, here {root})")
    return candidate.resolve()


def split_images(spec: YoloSpec, split: str) -> tuple[list[Path], list[LabelFault]]:
    """(image paths of ``split`` in a stable order, faults of its .txt lists such as listed files not found)."""
    if split not in spec.sources:
        raise DatasetError(f"{spec.yaml_path} has no `{split}` split (known: {', '.join(spec.sources)})")
    images: list[Path] = []
    faults: list[LabelFault] = []
    for source in spec.sources[split]:
        if source.is_dir():
            images += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif source.suffix.lower() == ".txt":
            for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
                entry = line.strip()
                if not entry:
                    continue
                image = Path(entry) if Path(entry).is_absolute() else (source.parent / entry)
                if not image.is_file() and not Path(entry).is_absolute() and (spec.root / entry).is_file():
                    image = spec.root / entry
                if not image.is_file():
                    faults.append(LabelFault("missing image files", True, f"{source}:{number}",
                                             f"{entry} not found", "fix the path in the list or remove the line"))
                    continue
                images.append(image.resolve())
        elif source.suffix.lower() in IMAGE_SUFFIXES:
            images.append(source)
        else:
            raise DatasetError(f"{spec.yaml_path}: `{split}` entry {source} is neither a folder, a .txt list nor an image")
    return images, faults


def label_path_for(image: Path) -> Path:
    """``.../images/a/x.jpg`` -> ``.../labels/a/x.txt`` (the last ``images`` part); beside the image otherwise."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def parse_label_file(path: Path, num_classes: int) -> tuple[list[tuple[int, float, float, float, float]], list[LabelFault]]:
    """(rows ``(class, cx, cy, w, h)`` that are usable, faults of the others). A missing file has no rows."""
    if not path.is_file():
        return [], []
    rows, faults = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return [], [LabelFault("unreadable label files", True, f"{path}:1", str(err), "rewrite the file as UTF-8 text")]
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            faults.append(LabelFault(
                "malformed label lines", True, where, f"{len(fields)} values in {line.strip()!r}",
                "each line is `class cx cy w h` (5 numbers; polygon/segment labels are not supported for detection)"))
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            faults.append(LabelFault("malformed label lines", True, where, f"not numbers: {line.strip()!r}",
                                     "each line is `class cx cy w h`, all numbers"))
            continue
        cls, cx, cy, w, h = values
        if cls != int(cls) or not 0 <= cls < num_classes:
            faults.append(LabelFault(
                "class ids out of range", True, where, f"class {fields[0]} (the data has classes 0..{num_classes - 1})",
                f"class ids are 0..{num_classes - 1}, the positions in `names`; fix the id or add the class to `names`"))
            continue
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            faults.append(LabelFault(
                "boxes outside [0, 1]", True, where, f"box {fields[1:]} is not normalised",
                "cx cy w h are fractions of the image width/height: divide pixel values by the image size"))
            continue
        if w <= 0 or h <= 0:
            faults.append(LabelFault("zero-size boxes", False, where, f"w {fields[3]} h {fields[4]} (dropped in training)",
                                     "remove the line or give the box a size"))
            continue
        rows.append((int(cls), cx, cy, w, h))
    return rows, faults


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header, or None when the file cannot be opened."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - reported by the pre-flight check, not here
        return None


@DATASETS.register
class YoloDetection(CocoDetection):
    """Split ``split`` of the YOLO dataset described by ``data_yaml``, as a CocoDetection (see the module doc).

    Labels are the YOLO class ids; ``class_names`` come from ``names``. With ``remap_mscoco_category`` the
    80 names must be COCO's classes in COCO's order (as in Ultralytics' coco.yaml), and predictions carry COCO's
    category ids. ``coco`` holds the in-memory COCO dict of this split (the evaluator's ground truth).
    """

    def __init__(self, data_yaml: str, split: str = "train", transforms: Any = None,
                 remap_mscoco_category: bool = False, category_mapping: str = "auto", return_masks: bool = False):
        if return_masks:
            raise ConfigError("YoloDetection: return_masks: true is not supported (detection only); set it to false")
        if category_mapping != "auto":
            raise ConfigError("YoloDetection: labels are the YOLO class ids; leave category_mapping at `auto`")
        self.spec = read_data_yaml(data_yaml)
        self.data_yaml, self.split = self.spec.yaml_path, split
        self.img_folder = self.spec.root
        self.ann_file = None
        self._init_state(transforms, remap_mscoco_category, "auto")
        names = self.spec.names
        if self.remap_mscoco_category and len(names) != len(MSCOCO_LABEL_TO_CATEGORY):
            raise DatasetError(f"{self.data_yaml}: remap_mscoco_category needs COCO's 80 classes, `names` has "
                               f"{len(names)}; set remap_mscoco_category: false")
        category_of = MSCOCO_LABEL_TO_CATEGORY if self.remap_mscoco_category else {i: i for i in range(len(names))}
        self.coco = self._build_coco(names, category_of)
        self._index(self.coco)
        if self.remap_mscoco_category:  # names from data.yaml, not COCO's table, so the user's spelling shows
            self.class_names_by_label = dict(enumerate(names))

    def _build_coco(self, names: list[str], category_of: dict[int, int]) -> dict:
        images_paths, _ = split_images(self.spec, self.split)
        if not images_paths:
            raise DatasetError(f"{self.data_yaml}: split `{self.split}` has no images ({self.spec.sources[self.split]})")
        images, annotations, skipped = [], [], 0
        for index, path in enumerate(images_paths):
            size = image_size(path)
            width, height = size if size else (0, 0)
            try:
                file_name = str(path.relative_to(self.spec.root))
            except ValueError:
                file_name = str(path)
            images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
            rows, faults = parse_label_file(label_path_for(path), len(names))
            skipped += sum(f.fatal for f in faults)
            for cls, cx, cy, w, h in rows:
                box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": category_of[cls],
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        if skipped:
            logger.warning("%s split %s: %d faulty label lines skipped (run tools/check_dataset.py --data %s)",
                           self.data_yaml, self.split, skipped, self.data_yaml)
        categories = [{"id": category_of[i], "name": name} for i, name in enumerate(names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def extra_repr(self) -> str:
        return f"data_yaml={self.data_yaml}, split={self.split}, images={len(self)}"
