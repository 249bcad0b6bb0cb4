"""The synthetic dataset: deterministic bytes, parameter-keyed cache, boxes on the drawn objects."""

from __future__ import annotations

import json

import numpy as np

from dfine.data.synthetic import SYNTHETIC_CLASSES, SyntheticDetection, ensure_synthetic_dataset


def folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    a = ensure_synthetic_dataset("train", 6, 96, seed=3, cache_dir=tmp_path / "a")
    b = ensure_synthetic_dataset("train", 6, 96, seed=3, cache_dir=tmp_path / "b")
    assert a.name == b.name
    assert folder_bytes(a) == folder_bytes(b)
    c = ensure_synthetic_dataset("train", 6, 96, seed=4, cache_dir=tmp_path / "a")
    assert c != a and folder_bytes(c)["instances.json"] != folder_bytes(a)["instances.json"]


def test_cache_reused_and_keyed_by_parameters(tmp_path):
    first = ensure_synthetic_dataset("val", 4, 96, cache_dir=tmp_path)
    stamp = (first / "instances.json").stat().st_mtime_ns
    assert ensure_synthetic_dataset("val", 4, 96, cache_dir=tmp_path) == first
    assert (first / "instances.json").stat().st_mtime_ns == stamp
    assert ensure_synthetic_dataset("val", 5, 96, cache_dir=tmp_path) != first
    assert ensure_synthetic_dataset("train", 4, 96, cache_dir=tmp_path) != first


def test_annotations_are_valid_and_cover_all_classes(tmp_path):
    folder = ensure_synthetic_dataset("train", 24, 128, cache_dir=tmp_path)
    coco = json.loads((folder / "instances.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(SYNTHETIC_CLASSES) + 1))
    assert {a["category_id"] for a in coco["annotations"]} == {c["id"] for c in coco["categories"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
        assert 0 < ann["area"] <= w * h


def test_boxes_bound_the_drawn_red_circles(tmp_path):
    dataset = SyntheticDetection("train", 24, 128, cache_dir=str(tmp_path))
    checked = 0
    for index in range(len(dataset)):
        image, target = dataset.load_item(index)
        for box, label in zip(target["boxes"], target["labels"]):
            if label != 0:  # red circles: easy to find by colour
                continue
            x1, y1, x2, y2 = box.astype(int)
            inside = image[y1:y2, x1:x2].astype(int)
            red = (inside[..., 0] - inside[..., 1] > 100) & (inside[..., 0] - inside[..., 2] > 100)
            ys, xs = np.nonzero(red)
            assert red.mean() > 0.4  # the box is mostly the object, not background
            assert xs.min() <= 2 and ys.min() <= 2 and xs.max() >= x2 - x1 - 3 and ys.max() >= y2 - y1 - 3
            checked += 1
    assert checked > 0
