"""`data: PATH` (dfine/data/layouts.py) and the YOLO reader (dfine/data/yolo.py): the same synthetic images written
as COCO, Roboflow COCO and YOLO give the same classes and targets, train with only `-u data=DIR`, and a YOLO set
with planted faults is reported file:line by the checker and the pre-flight, without a traceback."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dfine
from test_engine_trainer import write_tiny_config  # also registers the tiny stand-in detector
from dfine.cli import check_dataset as check_tool
from dfine.cli import train as train_tool
from dfine.config import ConfigError, load_config
from dfine.data.layouts import detect_layout
from dfine.data.loader import build_dataset
from dfine.data.synthetic import SYNTHETIC_CLASSES
from layouts_helpers import write_layouts

REPO = Path(__file__).resolve().parents[1]
NAMES = [name for name, _ in SYNTHETIC_CLASSES]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return write_layouts(root / "data", root / "cache")


def _targets(section: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{image file name: (labels, boxes xyxy px)} of a dataset section, untransformed, sorted by box."""
    dataset = build_dataset({k: v for k, v in section.items() if k != "transforms"}, "test")
    out = {}
    for i in range(len(dataset)):
        image, target = dataset.load_item(i)
        order = np.lexsort(target["boxes"].T[::-1])
        out[Path(dataset.images[i]["file_name"]).name] = (target["labels"][order], target["boxes"][order])
    return out, dataset.class_names


def test_three_layouts_same_classes_and_targets(layouts):
    seen = {}
    for kind, folder in layouts.items():
        layout = detect_layout(folder)
        assert layout.kind == {"coco": "coco", "roboflow": "roboflow-coco", "yolo": "yolo"}[kind]
        assert layout.class_names == NAMES
        seen[kind] = {split: _targets(layout.splits[split]) for split in ("train", "val")}
    for split in ("train", "val"):
        coco_targets, coco_names = seen["coco"][split]
        assert sum(len(labels) for labels, _ in coco_targets.values()) > 0
        for kind in ("roboflow", "yolo"):
            targets, names = seen[kind][split]
            assert names == coco_names == NAMES
            assert targets.keys() == coco_targets.keys()
            for name, (labels, boxes) in coco_targets.items():
                np.testing.assert_array_equal(targets[name][0], labels)
                # YOLO stores boxes as normalised decimals (10 digits): back in pixels within 1e-6 px
                np.testing.assert_allclose(targets[name][1], boxes, atol=1e-3, rtol=0)


def _tiny_config(tmp_path: Path) -> Path:
    """The tiny stand-in detector with every run setting in the file, so the command line carries only data=."""
    return write_tiny_config(tmp_path / "tiny_data.yml", ["runtime", "custom_detection", "optimizer", "dataloader"], """
device: cpu
epochs: 1
stop_epoch: 1
print_freq: 1
lr_warmup_scheduler: {type: LinearWarmup, warmup_duration: 1}
lr_scheduler: {type: MultiStepLR, milestones: [10], gamma: 0.1}
train_dataloader: {total_batch_size: 4, num_workers: 0, collate_fn: {base_size: 64, base_size_repeat: ~}}
val_dataloader: {total_batch_size: 4, num_workers: 0}
""")


@pytest.mark.parametrize("kind", ["coco", "roboflow", "yolo"])
def test_one_epoch_with_only_data(kind, layouts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output_dir of the base config is relative
    config = _tiny_config(tmp_path)
    assert train_tool.main(["-c", str(config), "-u", f"data={layouts[kind]}"]) == 0
    checkpoint = torch.load(tmp_path / "output" / "last.pth", weights_only=True)
    assert checkpoint["classes"]["names"] == NAMES and checkpoint["config"]["num_classes"] == len(NAMES)
    assert checkpoint["last_epoch"] == 0


def test_num_classes_that_disagrees_names_both_numbers(layouts, tmp_path):
    config = _tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"num_classes is 5 but the data at .* has 6 classes"):
        load_config(config, [f"data={layouts['yolo']}", "num_classes=5"])
    cfg = load_config(config, [f"data={layouts['coco']}", "num_classes=6"])  # agreeing is fine
    assert cfg["num_classes"] == 6 and cfg["model"]["decoder"]["num_classes"] == 6
    with pytest.raises(ConfigError, match="no known dataset layout"):
        load_config(config, [f"data={tmp_path}"])


def test_ultralytics_variants(layouts, tmp_path):
    """txt lists of images, names as a list, Roboflow's `../` paths; an image without a label file is empty."""
    root = tmp_path / "ultra"
    shutil.copytree(layouts["yolo"], root / "ds")
    train = sorted((root / "ds" / "images" / "train").glob("*.jpg"))
    (root / "ds" / "train.txt").write_text("".join(f"./images/train/{p.name}\n" for p in train))
    (root / "ds" / "labels" / "train" / f"{train[0].stem}.txt").unlink()
    (root / "ds" / "data.yaml").write_text(
        "train: train.txt\nval: ../images/val\nnc: 6\nnames: [" + ", ".join(NAMES) + "]\n")
    layout = detect_layout(root / "ds" / "data.yaml")
    assert layout.class_names == NAMES
    dataset = dfine.data.yolo.YoloDetection(str(root / "ds" / "data.yaml"), "train")
    assert len(dataset) == len(train)
    assert len(dataset.load_item(0)[1]["labels"]) == 0  # no label file: no objects
    assert len(dataset.coco["annotations"]) > 0


def _plant_faults(yolo: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the YOLO set with one fault of each kind; returns it and {where: kind}."""
    root = tmp_path / "faulty"
    shutil.copytree(yolo, root)
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    faults = {}
    for label, line, kind in ((labels[0], "0 0.5 0.5 0.2", "malformed label lines"),
                              (labels[1], "9 0.5 0.5 0.2 0.2", "class ids out of range"),
                              (labels[2], "1 0.5 0.5 1.4 0.2", "boxes outside [0, 1]")):
        rows = label.read_text().splitlines()
        label.write_text("\n".join([*rows, line]) + "\n")
        faults[f"{label}:{len(rows) + 1}"] = kind
    corrupt = sorted((root / "images" / "val").glob("*.jpg"))[0]
    corrupt.write_bytes(b"not a jpeg")
    faults[str(corrupt)] = "unreadable images"
    return root, faults


def test_check_dataset_reports_each_yolo_fault_by_file_and_line(layouts, tmp_path, capsys):
    root, faults = _plant_faults(layouts["yolo"], tmp_path)
    assert check_tool.main(["--data", str(root)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    for where, kind in faults.items():
        assert f"ERROR {kind}" in captured.out
        assert where in captured.out, where
    assert "FAILED" in captured.out
    assert check_tool.main(["--data", str(layouts["yolo"])]) == 0  # the clean set passes
    for kind in ("coco", "roboflow"):
        assert check_tool.main(["--data", str(layouts[kind])]) == 0


def test_preflight_stops_training_on_the_faults(layouts, tmp_path, monkeypatch, caplog):
    root, faults = _plant_faults(layouts["yolo"], tmp_path)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        code = train_tool.main(["-c", str(_tiny_config(tmp_path)), "-u", f"data={root}"])
    assert code == 3  # the pre-flight's exit status, no exception
    for where in faults:
        assert where in caplog.text, where
    assert not (tmp_path / "output" / "last.pth").exists()
