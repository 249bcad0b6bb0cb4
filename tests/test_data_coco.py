"""Category maps (1-indexed, sparse, COCO's 91 -> 80) and the COCO dataset's targets."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from dfine.data.coco import CocoDetection, DatasetError, build_category_map
from dfine.data.coco_categories import COCO_CATEGORIES, MSCOCO_CATEGORY_TO_LABEL, MSCOCO_LABEL_TO_CATEGORY
from dfine.data.loader import check_num_classes
from dfine.registry import ConfigError


def cats(ids):
    return [{"id": i, "name": f"c{i}"} for i in ids]


def test_one_indexed_ids_become_contiguous_labels():
    mapping, names = build_category_map(cats([1, 2, 3]), remap_mscoco_category=False)
    assert mapping == {1: 0, 2: 1, 3: 2} and names == {0: "c1", 1: "c2", 2: "c3"}


def test_sparse_ids_round_trip():
    mapping, _ = build_category_map(cats([42, 3, 7]), remap_mscoco_category=False)
    assert mapping == {3: 0, 7: 1, 42: 2}
    inverse = {label: cat for cat, label in mapping.items()}
    assert [inverse[mapping[c]] for c in (3, 7, 42)] == [3, 7, 42]


def test_identity_mapping_keeps_ids():
    mapping, _ = build_category_map(cats([1, 365]), remap_mscoco_category=False, category_mapping="identity")
    assert mapping == {1: 1, 365: 365}


def test_mscoco_remap_round_trip():
    ids = [cat for cat, _ in COCO_CATEGORIES]
    mapping, names = build_category_map(cats(ids), remap_mscoco_category=True)
    assert sorted(mapping.values()) == list(range(80))
    assert all(MSCOCO_LABEL_TO_CATEGORY[mapping[c]] == c for c in ids)
    assert (mapping[1], mapping[90], MSCOCO_CATEGORY_TO_LABEL[13]) == (0, 79, 11)  # 12 is one of COCO's gaps
    assert names[0] == "person"
    with pytest.raises(DatasetError, match="not COCO ids"):
        build_category_map(cats([1, 91]), remap_mscoco_category=True)


@pytest.fixture()
def tiny_coco(tmp_path):
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.zeros((40, 60, 3), np.uint8))
    coco = {
        "images": [{"id": 5, "file_name": "a.png", "width": 60, "height": 40}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 10, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 20, "bbox": [50, 30, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 5, "category_id": 10, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1},
            {"id": 4, "image_id": 5, "category_id": 20, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},
        ],
        "categories": cats([10, 20]),
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path


def test_dataset_targets_crowds_and_degenerate_boxes(tiny_coco):
    dataset = CocoDetection(str(tiny_coco / "img"), str(tiny_coco / "ann.json"))
    image, target = dataset[0]
    assert image.shape == (3, 40, 60)
    # the crowd region and the zero-width box are dropped; the second box is clipped to the image
    np.testing.assert_array_equal(target["boxes"].numpy(), [[10, 5, 30, 15], [50, 30, 60, 40]])
    assert target["labels"].tolist() == [0, 1] and target["image_id"].tolist() == [5]
    assert target["orig_size"].tolist() == [60, 40]
    assert dataset.category_map == {10: 0, 20: 1} and dataset.label_to_category == {0: 10, 1: 20}
    assert dataset.class_names == ["c10", "c20"]


def test_num_classes_checked_against_the_data(tiny_coco):
    dataset = CocoDetection(str(tiny_coco / "img"), str(tiny_coco / "ann.json"))
    check_num_classes(dataset, {"num_classes": 2}, "train_dataloader")
    with pytest.raises(ConfigError, match="num_classes: 2"):
        check_num_classes(dataset, {"num_classes": 1}, "train_dataloader")


def test_unknown_category_and_missing_image_have_clear_errors(tiny_coco):
    coco = json.loads((tiny_coco / "ann.json").read_text())
    coco["annotations"][0]["category_id"] = 99
    (tiny_coco / "bad.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="annotation id 1 has category_id 99"):
        CocoDetection(str(tiny_coco / "img"), str(tiny_coco / "bad.json"))
    (tiny_coco / "img" / "a.png").unlink()
    with pytest.raises(DatasetError, match="a.png"):
        CocoDetection(str(tiny_coco / "img"), str(tiny_coco / "ann.json"))[0]
