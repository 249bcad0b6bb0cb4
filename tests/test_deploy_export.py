"""ONNX export of the demo model: onnxruntime must reproduce PyTorch, with a fixed and a dynamic batch, and the
export tool must refuse to call a disagreeing model good."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import dfine  # noqa: E402
from dfine.deploy import DeployModel, OnnxDetector, compare_detections, export_onnx, load_detector  # noqa: E402
from dfine.deploy.export import parity_images  # noqa: E402
from helpers import make_demo_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "dfine_n_demo.yml"
SIZE = (256, 256)  # small and fast (N needs >= 300 anchors: 16x16 + 8x8); anchors are cached for it


def make_checkpoint(path: Path, overrides=()) -> Path:
    return make_demo_checkpoint(path, SIZE, overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo.pth")


@pytest.fixture(scope="module")
def dynamic_export(checkpoint, tmp_path_factory):
    model, post, cfg, _ = load_detector(checkpoint, deploy=True)
    deploy = DeployModel(model, post).eval()
    path = export_onnx(deploy, tmp_path_factory.mktemp("onnx") / "dyn.onnx", SIZE, dynamic_batch=True)
    return deploy, path


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_parity(dynamic_export, batch):
    deploy, path = dynamic_export
    detector = OnnxDetector(path)
    assert detector.fixed_batch is None and detector.image_size == SIZE
    images, sizes = parity_images(SIZE, batch, seed=batch)
    sizes[-1] = torch.tensor([640, 480])  # boxes scale to each image's own size
    with torch.no_grad():
        ours = deploy(images, sizes)
    theirs = detector(images, sizes)
    k = ours[2].shape[1]  # the config's num_top_queries
    assert [t.shape for t in theirs] == [(batch, k), (batch, k, 4), (batch, k)]
    report = compare_detections(ours, theirs, score_tol=1e-4, box_tol=0.05)
    print(f"batch {batch}: {report.describe()}")
    assert report.ok(score_tol=1e-4, box_tol=0.05), report.describe()
    assert report.max_abs_diff < 0.05
    assert theirs[1][-1].max() > 256  # scaled to 640x480, not to the 256 px input
    assert theirs[0].dtype == np.int64 and theirs[0].min() >= 0 and theirs[0].max() < 6


def test_deploy_form_matches_the_public_postprocessor(checkpoint):
    """The exported function is the public API's model + postprocessor: same scores and boxes, labels 0..C-1."""
    model, post, cfg, _ = load_detector(checkpoint, deploy=True)
    plain = dfine.build_model(cfg, load_pretrained=False)
    dfine.load_checkpoint(plain, checkpoint)
    plain.eval()
    images, sizes = parity_images(SIZE, 2)
    with torch.no_grad():
        dets = dfine.build_postprocessor(cfg)(plain(images), sizes)
        deployed = DeployModel(model, post)(images, sizes)
    reference = (torch.stack([d["labels"] for d in dets]), torch.stack([d["boxes"] for d in dets]), torch.stack([d["scores"] for d in dets]))
    assert compare_detections(reference, deployed, score_tol=1e-4, box_tol=0.01).ok(1e-4, 0.01)


def test_corrupted_export_is_caught(dynamic_export, tmp_path):
    """A model whose numbers drift (here: one weight changed) must fail the parity check."""
    import onnx
    from onnx import numpy_helper

    deploy, path = dynamic_export
    graph = onnx.load(str(path))
    biggest = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.data_type == onnx.TensorProto.FLOAT else 0)
    values = numpy_helper.to_array(biggest).copy()
    values *= 1.5
    biggest.CopyFrom(numpy_helper.from_array(values, biggest.name))
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    images, sizes = parity_images(SIZE, 2)
    with torch.no_grad():
        ours = deploy(images, sizes)
    report = compare_detections(ours, OnnxDetector(tmp_path / "bad.onnx")(images, sizes))
    assert not report.ok(score_tol=1e-3, box_tol=0.5), report.describe()


def test_export_tool(checkpoint, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import export_onnx as tool

    out = tmp_path / "fixed.onnx"
    # no -c: the config comes from the checkpoint; discrete sampling exports without grid_sample
    assert tool.main(["-r", str(checkpoint), "-o", str(out), "--sampling", "discrete"]) == 0
    printed = capsys.readouterr().out
    assert "parity on 2 images" in printed and "ok:" in printed
    import onnx

    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "GridSample" not in ops
    detector = OnnxDetector(out)
    assert detector.fixed_batch == 1
    # the file describes its classes: the checkpoint's names and label -> category id map
    assert detector.classes == {"names": ["circle", "square", "triangle", "cross", "star", "ring"],
                                "label_to_category": {str(i): i + 1 for i in range(6)}}
    # a tolerance nothing can meet: the tool must refuse, with a non-zero status and a clear message
    assert tool.main(["-r", str(checkpoint), "-o", str(out), "--score-tol", "-1"]) == 1
    assert "does NOT reproduce" in capsys.readouterr().err


def test_default_sampling_exports_grid_sample(dynamic_export):
    import onnx

    _, path = dynamic_export
    assert "GridSample" in {node.op_type for node in onnx.load(str(path)).graph.node}


def test_rtdetrv2_export_parity(tmp_path):
    """The other model family exports through the same path."""
    config = REPO / "configs" / "rtdetrv2_r18vd_coco.yml"
    if not config.is_file():
        pytest.skip("configs/rtdetrv2_r18vd_coco.yml not present")
    cfg = dfine.load_config(config, [f"eval_spatial_size=[{SIZE[0]}, {SIZE[1]}]"])
    torch.manual_seed(0)
    model = dfine.build_model(cfg, load_pretrained=False).eval()
    deploy = DeployModel(model.deploy(), dfine.build_postprocessor(cfg).deploy()).eval()
    path = export_onnx(deploy, tmp_path / "rtdetrv2.onnx", SIZE, dynamic_batch=True)
    images, sizes = parity_images(SIZE, 2)
    with torch.no_grad():
        ours = deploy(images, sizes)
    report = compare_detections(ours, OnnxDetector(path)(images, sizes), score_tol=1e-4, box_tol=0.05)
    assert report.ok(1e-4, 0.05), report.describe()


def test_compare_detections_pairs_tied_rows_and_flags_real_differences():
    labels = torch.tensor([[0, 1, 1, 2]])
    boxes = torch.tensor([[[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40], [1, 1, 2, 2]]], dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.5, 0.5 - 1e-7, 0.1]])
    # two detections of (nearly) equal score listed in the other order
    reordered = (labels[:, [0, 2, 1, 3]], boxes[:, [0, 2, 1, 3]], scores[:, [0, 2, 1, 3]])
    report = compare_detections((labels, boxes, scores), reordered)
    assert report.ok(1e-3, 0.5) and report.box_diff == 0 and report.unmatched == 0
    moved = boxes.clone()
    moved[0, 1] += 2.0  # one box two pixels off
    report = compare_detections((labels, boxes, scores), (labels, moved, scores))
    assert not report.ok(1e-3, 0.5) and report.unmatched == 1 and report.box_diff == pytest.approx(2.0)
    relabelled = labels.clone()
    relabelled[0, 0] = 3
    assert compare_detections((labels, boxes, scores), (relabelled, boxes, scores)).unmatched == 1
