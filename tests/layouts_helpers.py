"""Write one small synthetic dataset (dfine/data/synthetic.py) in each layout `data:` understands: COCO,
Roboflow COCO export and YOLO, with the same images, classes and boxes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dfine.data.synthetic import ensure_synthetic_dataset

SPLIT_FOLDERS = {"coco": {"train": "train2017", "val": "val2017"}, "roboflow": {"train": "train", "val": "valid"}}


def synthetic_split(cache: Path, split: str, num_images: int, image_size: int) -> tuple[Path, dict]:
    folder = ensure_synthetic_dataset(split, num_images, image_size, seed=3, max_objects=3, cache_dir=cache)
    return folder / "images", json.loads((folder / "instances.json").read_text())


def write_layouts(root: Path, cache: Path, num_images=(8, 4), image_size: int = 64) -> dict[str, Path]:
    """{'coco': folder, 'roboflow': folder, 'yolo': folder} for the synthetic train/val splits."""
    out = {kind: root / kind for kind in ("coco", "roboflow", "yolo")}
    for split, count in zip(("train", "val"), num_images):
        images, coco = synthetic_split(cache, split, count, image_size)
        # COCO: annotations/instances_<split>2017.json + <split>2017/
        target = out["coco"] / SPLIT_FOLDERS["coco"][split]
        shutil.copytree(images, target)
        (out["coco"] / "annotations").mkdir(parents=True, exist_ok=True)
        (out["coco"] / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
        # Roboflow: <split>/_annotations.coco.json beside the images
        target = out["roboflow"] / SPLIT_FOLDERS["roboflow"][split]
        shutil.copytree(images, target)
        (target / "_annotations.coco.json").write_text(json.dumps(coco))
        # YOLO: images/<split>, labels/<split>/*.txt with `class cx cy w h` normalised
        shutil.copytree(images, out["yolo"] / "images" / split)
        labels = out["yolo"] / "labels" / split
        labels.mkdir(parents=True)
        sizes = {im["id"]: (im["file_name"], im["width"], im["height"]) for im in coco["images"]}
        lines: dict[str, list[str]] = {name: [] for name, _, _ in sizes.values()}
        for ann in coco["annotations"]:
            name, width, height = sizes[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            values = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
            lines[name].append(f"{ann['category_id'] - 1} " + " ".join(f"{v:.10f}" for v in values))
        for name, rows in lines.items():
            if rows:  # images without objects get no label file, as YOLO tools write them
                (labels / Path(name).with_suffix(".txt").name).write_text("\n".join(rows) + "\n")
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    (out["yolo"] / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)))
    return out
