"""tools/infer.py on a folder of images and on a short video: the written detections must equal what the public
API (model + postprocessor, on the validation pipeline's preprocessing) gives for the same pictures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dfine
from dfine.data.transforms import ConvertPILImage, Resize
from dfine.deploy import compare_detections
from helpers import make_demo_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "dfine_n_demo.yml"
SIZE = (256, 256)


def make_checkpoint(path: Path) -> Path:
    return make_demo_checkpoint(path, SIZE)


def scene(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random RGB picture with a few filled rectangles, [H, W, 3] uint8."""
    import cv2

    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_LINEAR)
    for _ in range(3):
        x, y = int(rng.integers(0, width - 30)), int(rng.integers(0, height - 30))
        cv2.rectangle(image, (x, y), (x + 25, y + 25), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    return image


@pytest.fixture(scope="module")
def public_api(tmp_path_factory):
    """(checkpoint path, detect(rgb) -> (labels, boxes, scores)) through the public API and the val transforms."""
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo.pth")
    cfg = dfine.load_config(DEMO, [f"eval_spatial_size=[{SIZE[0]}, {SIZE[1]}]"])
    model = dfine.build_model(cfg, load_pretrained=False)
    dfine.load_checkpoint(model, path)
    model.eval()
    post = dfine.build_postprocessor(cfg)

    @torch.no_grad()
    def detect(rgb: np.ndarray):
        target = {"boxes": np.zeros((0, 4), np.float32)}
        image, _ = ConvertPILImage()(*Resize(list(SIZE))(rgb, target))
        det = post(model(image[None]), torch.tensor([[rgb.shape[1], rgb.shape[0]]]))[0]
        return det["labels"], det["boxes"], det["scores"]

    return path, detect


def run_tool(args) -> int:
    sys.path.insert(0, str(REPO / "tools"))
    import infer

    return infer.main([str(a) for a in args])


def records_as_outputs(records: list[dict], image_id: int):
    """COCO records of one image -> (labels 0..5, boxes xyxy, scores) batched [1, K]."""
    mine = [r for r in records if r["image_id"] == image_id]
    labels = torch.tensor([[r["category_id"] - 1 for r in mine]])
    boxes = torch.tensor([[[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)]])
    scores = torch.tensor([[r["score"] for r in mine]])
    return labels, boxes, scores


def assert_same(records, image_id, expected):
    labels, boxes, scores = expected
    got = records_as_outputs(records, image_id)
    assert got[2].shape[1] == scores.numel() > 0  # threshold 0: every detection (num_top_queries) is written
    report = compare_detections((labels[None], boxes[None], scores[None]), got, score_tol=1e-5, box_tol=1e-3)
    assert report.ok(1e-5, 1e-3), f"image {image_id}: {report.describe()}"


def test_folder(public_api, tmp_path):
    import cv2

    checkpoint, detect = public_api
    folder = tmp_path / "images"
    folder.mkdir()
    pictures = {"a.jpg": scene(0, 240, 320), "b.png": scene(1, 300, 200), "c.png": scene(2, 256, 256)}
    for name, rgb in pictures.items():
        cv2.imwrite(str(folder / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run_tool(["-r", checkpoint, "-i", folder, "-o", out, "-t", "0", "--batch-size", "2"]) == 0
    records = json.loads((out / "results.json").read_text())
    for image_id, name in enumerate(sorted(pictures)):
        written = cv2.cvtColor(cv2.imread(str(folder / name)), cv2.COLOR_BGR2RGB)  # jpg is lossy: compare on what was read
        assert_same(records, image_id, detect(written))
        assert {r["file_name"] for r in records if r["image_id"] == image_id} == {name}
        annotated = cv2.imread(str(out / f"{Path(name).stem}_det.jpg"))
        assert annotated.shape[:2] == pictures[name].shape[:2]
    assert {r["category_id"] for r in records} <= set(range(1, 7))  # the checkpoint's category ids, not labels


def test_video(public_api, tmp_path):
    import cv2

    checkpoint, detect = public_api
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (200, 150))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for i in range(3):
        writer.write(cv2.cvtColor(scene(10 + i, 150, 200), cv2.COLOR_RGB2BGR))
    writer.release()
    # the frames as a reader sees them (the codec is lossy)
    capture, frames = cv2.VideoCapture(str(video)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(frames) == 3
    out = tmp_path / "out"
    assert run_tool(["-r", checkpoint, "-i", video, "-o", out, "-t", "0", "--batch-size", "2"]) == 0  # batches 2 + 1
    records = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in records} == {0, 1, 2}
    for index, frame in enumerate(frames):
        assert_same(records, index, detect(frame))
    annotated = cv2.VideoCapture(str(out / "clip_det.mp4"))
    assert int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert int(annotated.get(cv2.CAP_PROP_FRAME_WIDTH)) == 200
    annotated.release()


def test_onnx_file_gives_the_same_results(public_api, tmp_path):
    """infer.py with the exported model writes the detections the checkpoint gives."""
    import cv2

    pytest.importorskip("onnxruntime")
    from dfine.deploy import DeployModel, export_onnx, load_detector

    checkpoint, detect = public_api
    model, post, _, classes = load_detector(checkpoint, deploy=True)
    bare = export_onnx(DeployModel(model, post), tmp_path / "bare.onnx", SIZE, dynamic_batch=True)
    cv2.imwrite(str(tmp_path / "x.png"), cv2.cvtColor(scene(5, 200, 260), cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    expected = detect(scene(5, 200, 260))
    # an .onnx file exported without class information: the checkpoint given with -c supplies it
    assert run_tool(["-r", bare, "-c", checkpoint, "-i", tmp_path / "x.png", "-o", out, "-t", "0"]) == 0
    assert_same(json.loads((out / "results.json").read_text()), 0, expected)
    assert run_tool(["-r", bare, "-i", tmp_path / "x.png", "-o", out, "-t", "0"]) == 0  # alone: ids are labels
    assert {r["category_id"] for r in json.loads((out / "results.json").read_text())} <= set(range(6))
    # with the class information in its metadata (as tools/export_onnx.py writes it) the file stands alone
    described = export_onnx(DeployModel(model, post), tmp_path / "described.onnx", SIZE, dynamic_batch=True,
                            classes={"names": classes.names, "label_to_category": classes.category_ids})
    assert run_tool(["-r", described, "-i", tmp_path / "x.png", "-o", out, "-t", "0"]) == 0
    assert_same(json.loads((out / "results.json").read_text()), 0, expected)


def test_bad_input_is_a_clear_error(public_api, tmp_path, capsys):
    checkpoint, _ = public_api
    assert run_tool(["-r", checkpoint, "-i", tmp_path / "missing.jpg", "-o", tmp_path / "o"]) == 2
    assert "missing.jpg" in capsys.readouterr().err
