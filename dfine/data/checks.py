"""Pre-flight dataset checks: find the problems that otherwise end in device asserts, AP 0 or NaN losses.

``check_dataset(ann_file, img_folder, num_classes)`` returns a ``CheckReport``; each ``Problem`` names the
image file or annotation id at fault and says how to fix it. Fatal problems stop training
(``report.raise_if_fatal()``, or exit status 1 from tools/check_dataset.py); the rest are warnings.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dfine.data.coco import DatasetError, build_category_map

logger = logging.getLogger(__name__)

EXAMPLES_PER_KIND = 5


@dataclass
class Problem:
    kind: str
    fatal: bool
    where: str
    message: str
    hint: str


@dataclass
class CheckReport:
    ann_file: str
    problems: list[Problem] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def add(self, kind: str, fatal: bool, where: str, message: str, hint: str) -> None:
        self.problems.append(Problem(kind, fatal, where, message, hint))

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def ok(self) -> bool:
        return not self.fatal

    def lines(self) -> list[str]:
        """Human-readable summary: the first few problems of each kind, with counts and hints."""
        out = [f"{self.ann_file}: " + ", ".join(f"{k} {v}" for k, v in self.stats.items())]
        by_kind: dict[str, list[Problem]] = defaultdict(list)
        for problem in self.problems:
            by_kind[problem.kind].append(problem)
        for kind, items in by_kind.items():
            level = "ERROR" if items[0].fatal else "WARNING"
            out.append(f"{level} {kind}: {len(items)} case(s). Fix: {items[0].hint}")
            for p in items[:EXAMPLES_PER_KIND]:
                out.append(f"    {p.where}: {p.message}")
            if len(items) > EXAMPLES_PER_KIND:
                out.append(f"    ... and {len(items) - EXAMPLES_PER_KIND} more")
        out.append("OK: no fatal problems" if self.ok else f"FAILED: {len(self.fatal)} fatal problem(s)")
        return out

    def log(self, log: logging.Logger = logger) -> None:
        for line in self.lines():
            (log.error if line.startswith(("ERROR", "FAILED")) else log.warning if line.startswith("WARNING")
             else log.info)(line)

    def raise_if_fatal(self) -> None:
        if not self.ok:
            raise DatasetError("dataset check failed:\n" + "\n".join(self.lines()))


def _check_duplicates(report: CheckReport, items: list[dict], what: str) -> None:
    counts = Counter(item.get("id") for item in items)
    for item_id, n in counts.items():
        if n > 1:
            report.add(f"duplicate {what} ids", True, f"{what} id {item_id}", f"appears {n} times",
                       f"give every {what} a unique `id` in the json")


def _check_image_file(report: CheckReport, path: Path, info: dict) -> None:
    where = f"image {info.get('file_name')} (id {info.get('id')})"
    if not path.is_file():
        report.add("missing image files", True, where, f"not found at {path}",
                   "check `img_folder` and the json's `file_name`s, or remove those images from the json")
        return
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            width, height = img.size
    except Exception as err:  # noqa: BLE001 - any decoder failure means the same thing here
        report.add("unreadable images", True, where, f"cannot be decoded ({type(err).__name__}: {err})",
                   "re-download or re-encode the file, or remove it from the json")
        return
    if "width" in info and "height" in info and (info["width"], info["height"]) != (width, height):
        report.add("image size mismatch", True, where,
                   f"json says {info['width']}x{info['height']}, the file is {width}x{height}",
                   "the boxes were drawn on another version of the image; fix `width`/`height` or the file")


def check_dataset(ann_file, img_folder, num_classes: int | None = None, remap_mscoco_category: bool = False,
                  category_mapping: str = "auto", check_images: bool = True) -> CheckReport:
    """Check a COCO-format json and its images. Never raises for a data problem: everything goes in the report."""
    ann_file, img_folder = Path(ann_file), Path(img_folder)
    report = CheckReport(str(ann_file))
    if not ann_file.is_file():
        report.add("missing annotation file", True, str(ann_file), "not found", "check the `--ann-file` path")
        return report
    try:
        coco = json.loads(ann_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        report.add("invalid json", True, str(ann_file), str(err), "the file is truncated or not json")
        return report
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco.get(k), list)]
    if missing:
        report.add("not a COCO instances file", True, str(ann_file), f"no `{'`, `'.join(missing)}` list",
                   "export the annotations in COCO detection format")
        return report
    images, annotations, categories = coco["images"], coco["annotations"], coco["categories"]
    report.stats = {"images": len(images), "annotations": len(annotations), "categories": len(categories)}
    _check_duplicates(report, images, "image")
    _check_duplicates(report, annotations, "annotation")
    _check_duplicates(report, categories, "category")

    category_ids = {c.get("id") for c in categories}
    try:
        category_map, _ = build_category_map(categories, remap_mscoco_category, category_mapping)
    except (DatasetError, ValueError, KeyError, TypeError) as err:
        report.add("category mapping", True, "categories", str(err), "fix `categories` or the remap settings")
        category_map = {}
    if num_classes is not None and category_map:
        needed = max(category_map.values()) + 1
        if needed > num_classes:
            report.add("num_classes mismatch", True, "categories",
                       f"labels reach {needed - 1} after category mapping but num_classes is {num_classes}",
                       f"set num_classes: {needed} in the config (or --num-classes {needed})")
        elif needed < num_classes:
            report.add("num_classes larger than the data", False, "categories",
                       f"the data has {needed} classes, num_classes is {num_classes}",
                       f"set num_classes: {needed} unless the extra classes are intended")

    image_info = {im.get("id"): im for im in images}
    annotated = set()
    for ann in annotations:
        where = f"annotation id {ann.get('id')} (image {image_info.get(ann.get('image_id'), {}).get('file_name')})"
        if ann.get("category_id") not in category_ids:
            report.add("unknown category ids", True, where, f"category_id {ann.get('category_id')} is not in "
                       "`categories`", "add the category to `categories` or fix the annotation")
        info = image_info.get(ann.get("image_id"))
        if info is None:
            report.add("annotations of unknown images", True, f"annotation id {ann.get('id')}",
                       f"image_id {ann.get('image_id')} is not in `images`", "fix the annotation's image_id")
            continue
        annotated.add(ann["image_id"])
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
                and all(math.isfinite(v) for v in bbox)):
            report.add("malformed boxes", True, where, f"bbox {bbox!r} is not 4 finite numbers [x, y, w, h]",
                       "COCO boxes are [x, y, width, height] in pixels")
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            report.add("zero or negative size boxes", False, where, f"bbox {bbox} has no area (dropped in training)",
                       "remove the annotation, or store [x, y, width, height] rather than [x1, y1, x2, y2]")
            continue
        width, height = info.get("width"), info.get("height")
        if width and height:
            if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                report.add("boxes outside the image", False, where,
                           f"bbox {bbox} lies outside the {width}x{height} image (dropped in training)",
                           "check the coordinates: pixels, [x, y, width, height], same image size")
            elif x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
                report.add("boxes crossing the image border", False, where,
                           f"bbox {bbox} extends beyond the {width}x{height} image (clipped in training)",
                           "usually harmless; clip the boxes to the image to silence this")
    unannotated = len(images) - len(annotated & set(image_info))
    report.stats["images without annotations"] = unannotated
    if check_images:
        for info in images:
            _check_image_file(report, img_folder / str(info.get("file_name")), info)
    return report


def check_yolo(data_yaml, splits=None, num_classes: int | None = None, check_images: bool = True) -> CheckReport:
    """Check a YOLO dataset (dfine/data/yolo.py): every label line of ``splits`` (default: all in data.yaml) and
    every image. Faults name ``file:line``. Never raises for a data problem."""
    from dfine.data.yolo import label_path_for, parse_label_file, read_data_yaml, split_images

    report = CheckReport(str(data_yaml))
    try:
        spec = read_data_yaml(data_yaml)
    except DatasetError as err:
        report.add("invalid data.yaml", True, str(data_yaml), str(err), "fix data.yaml (see dfine/data/yolo.py)")
        return report
    names = spec.names
    stats = Counter()
    for split in splits or list(spec.sources):
        try:
            images, faults = split_images(spec, split)
        except DatasetError as err:
            report.add("missing splits", True, str(spec.yaml_path), str(err), "add the split to data.yaml")
            continue
        stem_dirs = set()
        for image in images:
            label = label_path_for(image)
            stem_dirs.add((image.parent, label.parent))
            rows, label_faults = parse_label_file(label, len(names))
            faults += label_faults
            stats["images"] += 1
            stats["boxes"] += len(rows)
            stats["images without labels"] += not label.is_file()
            if check_images:
                _check_image_file(report, image, {"file_name": str(image), "id": f"{split} split"})
        known = {image.with_suffix("").name for image in images}
        for _, label_dir in stem_dirs:
            for label in sorted(label_dir.glob("*.txt")):
                if label.stem not in known:
                    faults.append(_label_without_image(label))
        for fault in faults:
            report.add(fault.kind, fault.fatal, fault.where, fault.message, fault.hint)
    report.stats = {"classes": len(names), **stats}
    if num_classes is not None and len(names) != num_classes:
        report.add("num_classes mismatch", len(names) > num_classes, str(spec.yaml_path),
                   f"data.yaml names {len(names)} classes, num_classes is {num_classes}",
                   f"set num_classes: {len(names)} (or leave it out with `data:`, it is then read from the data)")
    return report


def _label_without_image(label: Path):
    from dfine.data.yolo import LabelFault

    return LabelFault("label files without an image", False, f"{label}:1", "no image with this name in the split",
                      "remove the file or add the image (a typo in a file name loses its boxes)")


def check_data(path, num_classes: int | None = None, check_images: bool = True) -> list[CheckReport]:
    """Check every split of the dataset at ``path`` (any layout of dfine/data/layouts.py), one report per
    annotation file (COCO) or one for the YOLO data.yaml."""
    from dfine.data.layouts import detect_layout

    layout = detect_layout(path)
    if layout.kind == "yolo":
        return [check_yolo(layout.root, None, num_classes, check_images)]
    return [check_dataset(s["ann_file"], s["img_folder"], num_classes, check_images=check_images)
            for s in layout.splits.values()]


def check_loader_dataset(dataset, num_classes: int | None, check_images: bool = True) -> CheckReport:
    """The pre-flight check for a built CocoDetection (SyntheticDetection, YoloDetection), for the engine at
    train start."""
    if getattr(dataset, "data_yaml", None) is not None:
        return check_yolo(dataset.data_yaml, [dataset.split], num_classes, check_images)
    return check_dataset(dataset.ann_file, dataset.img_folder, num_classes, dataset.remap_mscoco_category,
                         dataset.category_mapping, check_images)
