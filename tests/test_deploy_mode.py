"""Deploy mode (``model.deploy()``: conv + BN fused, re-parameterised branches merged) on the inference paths: the
same detections as the training form on D-FINE-N with the reference weights and inputs, through ``tools/infer.py``
(deploy by default, ``--no-deploy``) and through ``tools/eval.py --deploy``."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import dfine
from dfine.cli import eval as eval_tool
from dfine.deploy import DeployModel, compare_detections
from dfine.deploy.export import parity_images
from dfine.layers.conv import memory_format_of
from helpers import REFERENCE_DIR, make_demo_checkpoint, reference

REPO = Path(__file__).resolve().parents[1]
SIZE = (256, 256)  # the demo model at 256: 16x16 + 8x8 anchors for its 100 queries

# Deploy vs training form, measured max |difference| over 1 and 2 threads: D-FINE-N with the reference perturbed
# weights at 640 on the two reference images and two smooth random ones: scores 5.4e-7, boxes 4.7e-4 px (raw logits
# 2.0e-5); the demo checkpoint at 256 on 2 x 4 smooth random images: scores 2.6e-8, boxes 9.2e-5 px. Folding BN into
# the convolution only rounds differently. The bounds leave 18x (score) and 21x (box) headroom; no detection may
# lack its counterpart.
SCORE_TOL, BOX_TOL = 1e-5, 1e-2
# deploy(channels_last=True) against the training form, the same inputs and threads: scores 3.7e-6, boxes 6.0e-3 px
# (the NHWC convolutions sum in another order); the bounds leave 27x and 17x headroom. The encoder's top-300 holds
# on other CPUs too: the form moves its scores by up to 3.8e-5, the smallest gap at the cut-off here is 2.4e-4.
CL_SCORE_TOL, CL_BOX_TOL = 1e-4, 0.1


@pytest.fixture(autouse=True)
def synthetic_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DFINE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def assert_same_detections(plain, deployed, score_tol=SCORE_TOL, box_tol=BOX_TOL):
    report = compare_detections(plain, deployed, score_tol=score_tol, box_tol=box_tol)
    assert report.ok(score_tol, box_tol) and report.unmatched == 0, report.describe()


@pytest.fixture(scope="module")
def reference_n():
    """D-FINE-N with the reference perturbed weights in eval mode, its deploy postprocessor, and the two reference
    images at 640 plus two smooth random ones with their original sizes."""
    weights = REFERENCE_DIR / "dfine_n_perturbed.pth"
    inputs = reference("inputs.pt")  # skips with a reason when ../shared/reference is absent
    cfg = dfine.load_config(REPO / "configs" / "dfine_n_coco.yml", ["eval_spatial_size=[640, 640]"])
    plain = dfine.build_model(cfg, load_pretrained=False)
    dfine.load_checkpoint(plain, weights)
    plain.eval()
    synthetic, synthetic_sizes = parity_images((640, 640), 2, seed=3)
    images = torch.cat([inputs["images_640_u8"].float() / 255, synthetic])
    sizes = torch.cat([inputs["orig_target_sizes_640"], synthetic_sizes])
    return plain, dfine.build_postprocessor(cfg).deploy(), images, sizes


def test_deploy_form_gives_the_same_detections_on_the_reference_inputs(reference_n):
    plain, post, images, sizes = reference_n
    deployed = copy.deepcopy(plain).deploy()
    # the encoder's 35 conv + BN pairs are folded; the backbone and the encoder's input projections keep theirs
    # (as in the reference's deploy mode)
    norms = lambda model: sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # noqa: E731
    assert (norms(plain), norms(deployed)) == (79, 44)
    with torch.no_grad():
        assert_same_detections(DeployModel(plain, post)(images, sizes), DeployModel(deployed, post)(images, sizes))


def test_channels_last_deploy_form_runs_nhwc_and_gives_the_same_detections(reference_n):
    plain, post, images, sizes = reference_n
    fast = copy.deepcopy(plain).deploy(channels_last=True)
    assert fast.backbone.stem.stem1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    layouts = []  # the memory format of the maps reaching the encoder: NHWC only in the channels-last form
    hook = lambda module, args: layouts.append(memory_format_of(args[0][0]))  # noqa: E731
    with torch.no_grad():
        handles = [m.encoder.register_forward_pre_hook(hook) for m in (plain, fast)]
        expected = DeployModel(plain, post)(images, sizes)
        got = DeployModel(fast, post)(images, sizes)  # NCHW images in: the NHWC stem weights set the layout
        for handle in handles:
            handle.remove()
    assert layouts == [torch.contiguous_format, torch.channels_last]
    assert_same_detections(expected, got, CL_SCORE_TOL, CL_BOX_TOL)


def run_infer(args) -> int:
    sys.path.insert(0, str(REPO / "tools"))
    import infer

    return infer.main([str(a) for a in args])


def test_infer_deploys_channels_last_by_default_on_cpu_and_other_forms_give_the_same_records(tmp_path, capsys):
    import cv2

    checkpoint = make_demo_checkpoint(tmp_path / "demo.pth", SIZE)
    folder = tmp_path / "images"
    folder.mkdir()
    images, _ = parity_images((240, 320), 2, seed=5)
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"{i}.png"), (image.permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype("uint8"))
    outputs = {}
    forms = {"default": ([], "(pytorch, channels-last, input"), "nchw": (["--no-channels-last"], "(pytorch, input"),
             "plain": (["--no-deploy"], "(pytorch, not deployed, input")}
    for name, (flags, kind) in forms.items():
        out = tmp_path / name
        assert run_infer(["-r", checkpoint, "-i", folder, "-o", out, "-t", "0", "--batch-size", "2", *flags]) == 0
        assert kind in capsys.readouterr().out
        outputs[name] = json.loads((out / "results.json").read_text())

    def as_outputs(records, image_id):  # COCO records -> (labels, boxes xyxy, scores) batched [1, K]
        mine = [r for r in records if r["image_id"] == image_id]
        return (torch.tensor([[r["category_id"] for r in mine]]),
                torch.tensor([[[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)]]),
                torch.tensor([[r["score"] for r in mine]]))

    for image_id in range(2):
        plain, deployed, fast = (as_outputs(outputs[name], image_id) for name in ("plain", "nchw", "default"))
        assert plain[2].numel() == deployed[2].numel() == fast[2].numel() == 100  # threshold 0: all are written
        assert_same_detections(plain, deployed)
        assert_same_detections(plain, fast, CL_SCORE_TOL, CL_BOX_TOL)


def test_eval_deploy_gives_the_same_metrics(tmp_path):
    checkpoint = make_demo_checkpoint(tmp_path / "demo.pth", SIZE)
    common = ["-r", checkpoint, "-d", "cpu", "-u", "val_dataloader.dataset.num_images=4",
              f"val_dataloader.dataset.image_size={SIZE[0]}", "val_dataloader.num_workers=0"]
    results = {}
    for flags in ([], ["--deploy"]):
        folder = tmp_path / ("deployed" if flags else "plain")
        assert eval_tool.main([str(a) for a in common] + ["--output-dir", str(folder), *flags]) == 0
        results[bool(flags)] = json.loads((folder / "eval_metrics.json").read_text())
    assert results[True]["num_detections"] == results[False]["num_detections"] > 0
    # the 12 COCO numbers from detections equal within the bounds above: identical on these 4 images
    assert results[True]["coco_eval_bbox"] == pytest.approx(results[False]["coco_eval_bbox"], abs=1e-6)


def test_predictor_channels_last_defaults_to_the_cpu_and_needs_the_deploy_form(tmp_path):
    from dfine.deploy import Predictor

    from dfine.deploy.loading import load_detector

    checkpoint = make_demo_checkpoint(tmp_path / "demo.pth", SIZE)
    assert Predictor.from_file(checkpoint).kind == "pytorch, channels-last"  # device="cpu" by default
    # what the Predictor loads for that form: the weights NHWC (they set the layout the maps run in)
    for flag in (False, True):
        model = load_detector(checkpoint, deploy=True, channels_last=flag)[0]
        # (a 1x1 or depthwise kernel is contiguous in both layouts, so only the others tell them apart)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        weights = [c.weight for c in convs if c.weight.shape[1] > 1 and c.kernel_size != (1, 1)]
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) == flag for w in weights)
    assert Predictor.from_file(checkpoint, channels_last=False).kind == "pytorch"
    assert Predictor.from_file(checkpoint, deploy=False).kind == "pytorch, not deployed"
    with pytest.raises(ValueError, match="deploy form"):
        Predictor.from_file(checkpoint, deploy=False, channels_last=True)
