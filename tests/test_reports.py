"""Visual evaluation reports on a hand-made case: PR curves and confusion matrix checked against hand-computed
values and against the COCO evaluator itself."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest

from dfine.evaluation import evaluate_records
from dfine.evaluation.reports import confusion_matrix, pr_curves, write_visual_reports

CAT, DOG, BIRD = 1, 2, 3


def hand_made() -> tuple[dict, list[dict]]:
    """Two 100x100 images. Image 1: cats A, B and dog C; image 2: dog D and a crowd region of cats."""
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"},
                   {"id": 2, "width": 100, "height": 100, "file_name": "b.png"}],
        "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}, {"id": BIRD, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": CAT, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},  # A
            {"id": 2, "image_id": 1, "category_id": CAT, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},  # B
            {"id": 3, "image_id": 1, "category_id": DOG, "bbox": [10, 60, 20, 20], "area": 400, "iscrowd": 0},  # C
            {"id": 4, "image_id": 2, "category_id": DOG, "bbox": [30, 30, 30, 30], "area": 900, "iscrowd": 0},  # D
            {"id": 5, "image_id": 2, "category_id": CAT, "bbox": [60, 0, 40, 40], "area": 1600, "iscrowd": 1},
        ],
    }
    dets = [
        {"image_id": 1, "category_id": CAT, "bbox": [10, 10, 20, 20], "score": 0.9},  # true positive on A
        {"image_id": 1, "category_id": CAT, "bbox": [11, 11, 20, 20], "score": 0.8},  # duplicate of A
        {"image_id": 1, "category_id": DOG, "bbox": [50, 50, 20, 20], "score": 0.7},  # cat B called a dog
        {"image_id": 1, "category_id": CAT, "bbox": [10, 60, 20, 20], "score": 0.1},  # below the score threshold
        {"image_id": 2, "category_id": DOG, "bbox": [30, 30, 30, 30], "score": 0.6},  # true positive on D
        {"image_id": 2, "category_id": CAT, "bbox": [65, 5, 20, 20], "score": 0.5},   # inside the crowd: ignored
        {"image_id": 2, "category_id": BIRD, "bbox": [0, 0, 10, 10], "score": 0.4},   # nothing there
    ]
    return gt, dets


def test_pr_curves_hand_computed_and_equal_to_coco_ap():
    gt, dets = hand_made()
    result = evaluate_records(gt, dets)
    curves = pr_curves(result.precision, result.rec_thrs, result.iou_thrs, result.cat_ids, iou=0.5)
    # cat: TP (0.9), FP (0.8), ignored (0.5), FP (0.1) over 2 objects -> precision 1 up to recall 0.5, then nothing
    np.testing.assert_allclose(curves.per_class[CAT], [1.0] * 51 + [0.0] * 50)
    # dog: FP (0.7) then TP (0.6) over 2 objects -> interpolated precision 0.5 up to recall 0.5
    np.testing.assert_allclose(curves.per_class[DOG], [0.5] * 51 + [0.0] * 50)
    assert BIRD not in curves.per_class  # no ground truth: undefined, as COCO leaves it
    assert curves.ap[CAT] == pytest.approx(51 / 101)
    assert curves.ap[DOG] == pytest.approx(25.5 / 101)
    # agreement with the evaluator's own numbers: AP50 overall and per class
    assert curves.overall_ap == pytest.approx(result.stats[1], abs=1e-12)
    assert curves.overall_ap == pytest.approx((51 + 25.5) / 202)
    per_class = {row["category_id"]: row for row in result.per_class}
    assert curves.ap[CAT] == pytest.approx(per_class[CAT]["ap50"])
    assert curves.ap[DOG] == pytest.approx(per_class[DOG]["ap50"])
    mean = pr_curves(result.precision, result.rec_thrs, result.iou_thrs, result.cat_ids, iou=None)
    assert mean.overall_ap == pytest.approx(result.stats[0], abs=1e-12)


def test_confusion_matrix_hand_computed():
    gt, dets = hand_made()
    matrix, cat_ids = confusion_matrix(gt, dets, iou_threshold=0.5, score_threshold=0.25)
    assert cat_ids == [CAT, DOG, BIRD]
    expected = np.array([
        # cat dog bird missed
        [1, 1, 0, 0],  # cat: A found, B called a dog
        [0, 1, 0, 1],  # dog: D found, C missed (the 0.1 detection on it is below the score threshold)
        [0, 0, 0, 0],  # bird
        [1, 0, 1, 0],  # background: the duplicate cat and the bird; the crowd detection counts nowhere
    ])
    np.testing.assert_array_equal(matrix, expected)
    matrix_low, _ = confusion_matrix(gt, dets, iou_threshold=0.5, score_threshold=0.0)
    assert matrix_low[1, 0] == 1 and matrix_low[1, 3] == 0  # with every score, C is the cat detection's confusion


@pytest.mark.parametrize("score_threshold", [0.0, 0.25, 0.65])
def test_confusion_diagonal_equals_coco_true_positives(score_threshold):
    """The diagonal must be COCO's own true positives at IoU 0.5 (pycocotools' evalImgs), for any threshold."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = hand_made()
    # more detections so that greedy order matters: two overlapping candidates for one object
    dets = dets + [{"image_id": 2, "category_id": DOG, "bbox": [32, 32, 30, 30], "score": 0.65},
                   {"image_id": 1, "category_id": CAT, "bbox": [48, 52, 20, 20], "score": 0.3}]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
    t50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    coco_tp = {c: 0 for c in (CAT, DOG, BIRD)}
    for record in evaluator.evalImgs:
        if record is None or record["aRng"] != evaluator.params.areaRng[0]:
            continue
        for det_id, matched, ignored, score in zip(record["dtIds"], record["dtMatches"][t50], record["dtIgnore"][t50], record["dtScores"]):
            if matched > 0 and not ignored and score >= score_threshold:
                coco_tp[record["category_id"]] += 1
    matrix, cat_ids = confusion_matrix(gt, dets, iou_threshold=0.5, score_threshold=score_threshold)
    assert [int(matrix[i, i]) for i in range(len(cat_ids))] == [coco_tp[c] for c in cat_ids]
    # every counted detection lands in exactly one cell, every non-crowd object in exactly one row cell
    counted = sum(1 for d in dets if d["score"] >= score_threshold and not (d["image_id"] == 2 and d["category_id"] == CAT))
    assert matrix[:, :-1].sum() == counted
    assert matrix[:-1, :].sum() == sum(1 for a in gt["annotations"] if not a["iscrowd"])


def test_write_visual_reports(tmp_path):
    import cv2
    from torch.utils.tensorboard import SummaryWriter

    gt, dets = hand_made()
    for info in gt["images"]:
        cv2.imwrite(str(tmp_path / info["file_name"]), np.full((100, 100, 3), 90, np.uint8))
    result = evaluate_records(gt, dets)
    writer = SummaryWriter(str(tmp_path / "tb"))
    paths = write_visual_reports(result, gt, tmp_path / "reports", image_root=tmp_path, writer=writer, step=3)
    writer.close()
    assert set(paths) == {"pr_curves", "confusion_matrix", "predictions_grid"}
    for path in paths.values():
        image = cv2.imread(str(path))
        assert image is not None and image.shape[0] > 50 and image.shape[1] > 50
    grid = cv2.imread(str(paths["predictions_grid"]))
    assert grid.shape[0] == 2 * 320  # one row per validation image
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())
    assert (tmp_path / "reports" / "confusion_matrix.json").is_file()


def test_reports_for_a_dataset_never_raise(tmp_path, caplog):
    """The evaluation loop's entry point: images from the dataset's img_folder; a failure is a warning."""
    from types import SimpleNamespace

    import cv2

    from dfine.evaluation.reports import write_reports_for_dataset

    gt, dets = hand_made()
    result = evaluate_records(gt, dets)
    for info in gt["images"]:
        cv2.imwrite(str(tmp_path / info["file_name"]), np.full((80, 120, 3), 60, np.uint8))
    paths = write_reports_for_dataset(result, gt, SimpleNamespace(img_folder=tmp_path), tmp_path / "ok")
    assert paths["predictions_grid"].is_file()
    missing = write_reports_for_dataset(result, gt, SimpleNamespace(img_folder=tmp_path / "nowhere"), tmp_path / "bad")
    assert missing == {} and "visual reports not written" in caplog.text
