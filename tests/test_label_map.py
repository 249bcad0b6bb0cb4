"""LabelMap (dfine/data/classes.py), the one owner of label semantics, and the shared box ops it travels with:
each source of class descriptions gives the same answers, and the stored layouts stay those already on disk."""

from __future__ import annotations

import json

import pytest
import torch

from dfine.data.classes import LabelMap
from dfine.data.coco_categories import COCO_CLASS_NAMES, MSCOCO_LABEL_TO_CATEGORY
from dfine.ops.boxes import box_xyxy_to_xywh, generalized_box_iou

STORED = {"names": ["circle", "square", ""], "label_to_category": {0: 10, 1: 20, 2: 30}, "remap_mscoco_category": False}


class FakeDataset:
    class_names = ["circle", "square", ""]
    label_to_category = {0: 10, 1: 20, 2: 30}


def test_every_source_gives_the_same_answers():
    from_checkpoint = LabelMap.from_checkpoint(STORED)
    from_dataset = LabelMap.from_dataset(FakeDataset())
    # ONNX metadata travels as JSON: string keys
    from_metadata = LabelMap.from_metadata(json.loads(json.dumps(from_checkpoint.to_metadata())))
    for labels in (from_checkpoint, from_dataset, from_metadata):
        assert [labels.category_id(i) for i in range(3)] == [10, 20, 30]
        assert [labels.name(i) for i in range(3)] == ["circle", "square", "2"]  # an empty name falls back to the label
        assert labels.category_id(7) == 7 and labels.name(7) == "7"  # unknown labels are their own id and name
        assert labels.label_of_category(20) == 1
        assert labels.map_labels(torch.tensor([2, 0])).tolist() == [30, 10]


def test_stored_layouts_are_unchanged():
    assert LabelMap.from_checkpoint(STORED).to_checkpoint() == STORED
    assert LabelMap.from_checkpoint(STORED).to_metadata() == {"names": ["circle", "square", ""],
                                                             "label_to_category": {"0": 10, "1": 20, "2": 30}}
    assert LabelMap.from_checkpoint(None).to_checkpoint() == {"names": [], "label_to_category": {}, "remap_mscoco_category": False}


@pytest.mark.parametrize("where", ["checkpoint", "config"])
def test_coco_remap_uses_the_coco_table(where):
    stored = {"names": [], "label_to_category": {}, "remap_mscoco_category": where == "checkpoint"}
    labels = LabelMap.from_checkpoint(stored, {"remap_mscoco_category": where == "config"})
    assert labels.remap_mscoco_category and labels.names == list(COCO_CLASS_NAMES)
    assert labels.category_id(11) == 13 and labels.name(0) == "person"  # COCO has no id 12: label 11 is stop sign
    table = LabelMap.coco().lookup_table()
    assert table.tolist() == [MSCOCO_LABEL_TO_CATEGORY[i] for i in range(80)] and table[-1] == 90


def test_xyxy_to_xywh_by_hand():
    assert box_xyxy_to_xywh(torch.tensor([[1.0, 2.0, 4.0, 8.0]])).tolist() == [[1.0, 2.0, 3.0, 6.0]]


def test_pairwise_giou_broadcasts_like_a_loop_over_images():
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(3, 2, 5, 2, generator=g)
    boxes1 = torch.cat([corners, corners + torch.rand(3, 2, 5, 2, generator=g)], -1)  # [3, 2, 5, 4] layers x images
    boxes2 = torch.cat([corners[0, :, :4], corners[0, :, :4] + 0.3], -1)  # [2, 4, 4]: one target set per image
    batched = generalized_box_iou(boxes1, boxes2[None])
    assert batched.shape == (3, 2, 5, 4)
    for layer in range(3):
        for image in range(2):
            # the same elementwise operations on the same numbers: identical to the last bit
            assert torch.equal(batched[layer, image], generalized_box_iou(boxes1[layer, image], boxes2[image]))
    # hand value: unit squares offset by half diagonally: intersection 0.25, union 1.75, enclosing 1.5 x 1.5
    pair = generalized_box_iou(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.5, 0.5, 1.5, 1.5]]))
    assert pair.item() == pytest.approx(0.25 / 1.75 - (2.25 - 1.75) / 2.25, rel=1e-6)


def test_giou_check_rejects_inverted_boxes_unless_asked_not_to():
    inverted = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="inverted"):
        generalized_box_iou(inverted, inverted)
    nan = torch.full((1, 4), float("nan"))
    assert torch.isnan(generalized_box_iou(nan, nan, check=False)).all()  # the matcher's NaN handling sees it
