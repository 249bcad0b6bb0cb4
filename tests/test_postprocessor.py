"""DFINEPostProcessor: hand-checked small cases and the reference's postprocessed detections."""

from __future__ import annotations

import pytest
import torch

from dfine.data.coco_categories import MSCOCO_LABEL_TO_CATEGORY
from dfine.models.postprocessor import DFINEPostProcessor
from helpers import PIXEL_BOX_TOL


def logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def test_focal_topk_runs_over_queries_and_classes():
    # 2 queries x 3 classes; query 1 holds the two best (query, class) pairs.
    logits = torch.tensor([[[logit(0.2), logit(0.1), logit(0.3)], [logit(0.9), logit(0.05), logit(0.8)]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    post = DFINEPostProcessor(num_classes=3, num_top_queries=3)
    (det,) = post({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 100]]))  # (w, h)
    assert det["labels"].tolist() == [0, 2, 2]
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.8, 0.3]))
    # query 1: cx 0.25*200=50, cy 0.75*100=75, w 100, h 50 -> (0, 50, 100, 100); query 0 -> (80, 30, 120, 70)
    expected = torch.tensor([[0.0, 50.0, 100.0, 100.0], [0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]])
    torch.testing.assert_close(det["boxes"], expected)


def test_remap_to_coco_ids_and_deploy_form():
    logits = torch.full((1, 4, 80), -10.0)
    logits[0, 0, 11] = 5.0  # label 11 is "stop sign", COCO id 13
    logits[0, 2, 79] = 4.0  # label 79 is "toothbrush", COCO id 90
    boxes = torch.rand(1, 4, 4) * 0.5 + 0.25
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    sizes = torch.tensor([[640, 480]])
    post = DFINEPostProcessor(num_classes=80, num_top_queries=2, remap_mscoco_category=True)
    (det,) = post(outputs, sizes)
    assert det["labels"].tolist() == [13, 90]
    assert MSCOCO_LABEL_TO_CATEGORY[11] == 13 and MSCOCO_LABEL_TO_CATEGORY[79] == 90
    labels, deploy_boxes, scores = post.deploy()(outputs, sizes)
    assert labels.tolist() == [[11, 79]]  # deploy keeps contiguous labels
    torch.testing.assert_close(deploy_boxes[0], det["boxes"])
    torch.testing.assert_close(scores[0], det["scores"])


def test_softmax_variant_keeps_best_class_per_query():
    # 3 classes + background; query 0 best class 1, query 1 best class 0.
    logits = torch.log(torch.tensor([[[0.1, 0.6, 0.1, 0.2], [0.5, 0.1, 0.1, 0.3]]]))
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]])
    post = DFINEPostProcessor(num_classes=3, use_focal_loss=False, num_top_queries=5)
    (det,) = post({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20]]))
    assert det["labels"].tolist() == [1, 0]
    torch.testing.assert_close(det["scores"], torch.tensor([0.6, 0.5]))
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 10.0, 20.0], [2.5, 5.0, 7.5, 15.0]]))


def test_remap_needs_the_80_coco_classes():
    with pytest.raises(ValueError, match="num_classes is 3"):
        DFINEPostProcessor(num_classes=3, remap_mscoco_category=True)


@pytest.mark.parametrize("size", ["640", "320"])
def test_matches_reference_postprocessed(reference_dir, size):
    ref = torch.load(reference_dir / "eval_n_perturbed.pt", weights_only=True)[size]
    post = DFINEPostProcessor(num_classes=80, num_top_queries=300, remap_mscoco_category=True)
    outputs = {"pred_logits": ref["pred_logits"], "pred_boxes": ref["pred_boxes"]}
    detections = post(outputs, ref["orig_target_sizes"])
    for det, expected in zip(detections, ref["postprocessed"]):
        assert torch.equal(det["labels"], expected["labels"])
        torch.testing.assert_close(det["boxes"], expected["boxes"], **PIXEL_BOX_TOL)
        torch.testing.assert_close(det["scores"], expected["scores"], atol=1e-4, rtol=0)
