"""Pre-flight dataset checks: one case per problem kind, fatal vs warning, and the CLI's exit status."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from dfine.data.checks import check_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_dataset as check_cli  # noqa: E402

GOOD = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
               {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
                    {"id": 2, "image_id": 2, "category_id": 7, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0}],
    "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
}


@pytest.fixture()
def folder(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(tmp_path / name), np.zeros((48, 64, 3), np.uint8))
    return tmp_path


def run(folder, coco, **kwargs):
    (folder / "ann.json").write_text(json.dumps(coco))
    return check_dataset(folder / "ann.json", folder, **kwargs)


def kinds(report):
    return {(p.kind, p.fatal) for p in report.problems}


def test_clean_dataset_passes(folder):
    report = run(folder, GOOD, num_classes=2)
    assert report.ok and report.problems == [] and report.stats["images without annotations"] == 0


def edit(change):
    coco = copy.deepcopy(GOOD)
    change(coco)
    return coco


CASES = {
    "missing image files": (lambda c: c["images"][1].update(file_name="missing.jpg"), True),
    "zero or negative size boxes": (lambda c: c["annotations"][0].update(bbox=[5, 5, 0, 10]), False),
    "boxes outside the image": (lambda c: c["annotations"][0].update(bbox=[100, 5, 10, 10]), False),
    "boxes crossing the image border": (lambda c: c["annotations"][0].update(bbox=[50, 5, 30, 10]), False),
    "unknown category ids": (lambda c: c["annotations"][0].update(category_id=4), True),
    "duplicate annotation ids": (lambda c: c["annotations"][1].update(id=1), True),
    "duplicate image ids": (lambda c: c["images"].append(dict(c["images"][0])), True),
    "malformed boxes": (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), True),
    "image size mismatch": (lambda c: c["images"][0].update(width=65), True),
}


@pytest.mark.parametrize("kind", CASES)
def test_each_problem_is_reported_with_its_severity(folder, kind):
    change, fatal = CASES[kind]
    report = run(folder, edit(change), num_classes=2)
    assert (kind, fatal) in kinds(report)
    assert report.ok is not fatal
    problem = next(p for p in report.problems if p.kind == kind)
    assert ("annotation id" in problem.where or "image" in problem.where) and problem.hint


def test_corrupt_image_is_fatal(folder):
    (folder / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    report = run(folder, GOOD)
    assert ("unreadable images", True) in kinds(report)
    assert "b.jpg" in next(p.where for p in report.problems if p.kind == "unreadable images")


def test_num_classes_mismatch_and_surplus(folder):
    assert ("num_classes mismatch", True) in kinds(run(folder, GOOD, num_classes=1))
    assert kinds(run(folder, GOOD, num_classes=5)) == {("num_classes larger than the data", False)}


def test_images_without_annotations_are_counted(folder):
    report = run(folder, edit(lambda c: c["annotations"].pop()))
    assert report.ok and report.stats["images without annotations"] == 1


def test_cli_exit_status_without_traceback(folder, capsys):
    (folder / "ann.json").write_text(json.dumps(GOOD))
    args = ["--ann-file", str(folder / "ann.json"), "--img-folder", str(folder)]
    assert check_cli.main(args + ["--num-classes", "2"]) == 0
    assert check_cli.main(args + ["--num-classes", "1"]) == 1
    out = capsys.readouterr().out
    assert "set num_classes: 2" in out and "Traceback" not in out
    assert check_cli.main(["--ann-file", str(folder / "nope.json"), "--img-folder", str(folder)]) == 1
