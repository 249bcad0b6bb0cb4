"""COCO evaluator: our numbers against pycocotools' own loadRes + COCOeval on a hand-made set."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from dfine.evaluation import CocoEvaluator, evaluate_records

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


def hand_made_set():
    """3 images, 2 categories (ids 1 and 3, not contiguous), boxes of all three COCO area ranges."""
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in (1, 2, 7)]
    categories = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    boxes = [  # image, category, x, y, w, h
        (1, 1, 10, 10, 20, 20), (1, 3, 100, 100, 60, 50), (1, 1, 300, 200, 200, 150),
        (2, 3, 50, 60, 30, 25), (2, 3, 400, 300, 120, 100),
        (7, 1, 0, 0, 640, 480), (7, 3, 200, 200, 8, 9),
    ]  # fmt: skip
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
        for k, (i, c, x, y, w, h) in enumerate(boxes)
    ]
    gt = {"images": images, "categories": categories, "annotations": annotations}
    rng = np.random.default_rng(0)
    dets = []
    for _, i, c, x, y, w, h in [(0, *b) for b in boxes]:
        # a good detection, a shifted one, and a wrong-class one per object, with scattered scores
        jitter = rng.uniform(-0.15, 0.15, 4) * [w, h, w, h]
        dets.append({"image_id": i, "category_id": c, "bbox": list(np.array([x, y, w, h]) + jitter / 3), "score": float(rng.uniform(0.5, 1))})
        dets.append({"image_id": i, "category_id": c, "bbox": [x + w / 2, y, w, h], "score": float(rng.uniform(0, 1))})
        dets.append({"image_id": i, "category_id": 4 - c, "bbox": [x, y, w, h], "score": float(rng.uniform(0, 0.6))})
    for d in dets:
        d["bbox"] = [float(v) for v in d["bbox"]]
    return gt, dets


def pycocotools_stats(gt, dets, cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        result = coco.loadRes(dets)
        ev = COCOeval(coco, result, "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_stats_and_per_class_match_pycocotools(backend):
    if backend == "faster_coco_eval":
        pytest.importorskip("faster_coco_eval")
    gt, dets = hand_made_set()
    expected = pycocotools_stats(gt, dets)
    result = evaluate_records(gt, dets, backend=backend)
    assert len(result.stats) == 12
    np.testing.assert_allclose(result.stats, expected, atol=1e-6)
    assert 0.0 < result.stats[0] < 1.0  # the set is neither trivial nor hopeless
    for row in result.per_class:
        alone = pycocotools_stats(gt, dets, cat_ids=[row["category_id"]])
        assert row["ap"] == pytest.approx(alone[0], abs=1e-6)
        assert row["ap50"] == pytest.approx(alone[1], abs=1e-6)
    assert {r["name"]: r["num_gt"] for r in result.per_class} == {"cat": 3, "dog": 4}
    assert "dog" in result.per_class_table()


def test_evaluator_from_xyxy_tensors_equals_records():
    gt, dets = hand_made_set()
    per_image = {}
    for d in dets:
        x, y, w, h = d["bbox"]
        entry = per_image.setdefault(d["image_id"], {"boxes": [], "scores": [], "labels": []})
        entry["boxes"].append([x, y, x + w, y + h])
        entry["scores"].append(d["score"])
        entry["labels"].append(d["category_id"])
    evaluator = CocoEvaluator(gt, backend="pycocotools")
    for image_id, entry in per_image.items():
        tensors = {k: torch.tensor(v) for k, v in entry.items()}
        evaluator.update({image_id: tensors})
        evaluator.update({image_id: {k: v[:1] for k, v in tensors.items()}})  # a padded repeat is ignored
    np.testing.assert_allclose(evaluator.summarize().stats, pycocotools_stats(gt, dets), atol=1e-5)


def test_no_detections_gives_zero_ap():
    gt, _ = hand_made_set()
    result = evaluate_records(gt, [], backend="pycocotools")
    assert result.stats[0] == 0.0 and result.num_detections == 0
