"""Pure loss functions: values derived by hand on tiny inputs, and float64 gradient checks."""

from __future__ import annotations

import math

import torch

from dfine.losses import functional as L
from dfine.ops.boxes import elementwise_generalized_box_iou, generalized_box_iou


def test_giou_by_hand():
    # [0,0,2,2] and [1,1,3,3]: intersection 1, union 7, enclosing box 9.
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    expected = 1 / 7 - (9 - 7) / 9
    assert math.isclose(elementwise_generalized_box_iou(a, b).item(), expected, rel_tol=1e-6)
    assert math.isclose(generalized_box_iou(a, b).item(), expected, rel_tol=1e-6)
    # As a loss on cxcywh boxes: centres (1,1) and (2,2), sizes 2x2; two boxes, the second identical (loss 0).
    pred = torch.tensor([[1.0, 1.0, 2.0, 2.0], [0.5, 0.5, 0.2, 0.2]])
    tgt = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.5, 0.5, 0.2, 0.2]])
    assert math.isclose(L.giou_box_loss(pred, tgt, num_boxes=2.0).item(), (1 - expected) / 2, rel_tol=1e-6)
    weighted = L.giou_box_loss(pred, tgt, num_boxes=1.0, weight=torch.tensor([0.5, 3.0]))
    assert math.isclose(weighted.item(), 0.5 * (1 - expected), rel_tol=1e-6)


def test_giou_disjoint_boxes_is_negative():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    # No overlap: union 2, enclosing 3 -> GIoU = 0 - 1/3.
    assert math.isclose(elementwise_generalized_box_iou(a, b).item(), -1 / 3, rel_tol=1e-6)


def test_l1_by_hand():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    tgt = torch.tensor([[0.4, 0.7, 0.2, 0.1]])
    assert math.isclose(L.l1_box_loss(pred, tgt, 2.0).item(), (0.1 + 0.2 + 0.0 + 0.1) / 2, rel_tol=1e-5)


def _bce(x: float, t: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_varifocal_by_hand():
    # One image, two queries, two classes; query 1 is matched to class 0 with IoU 0.6.
    logits = torch.tensor([[[0.3, -1.0], [2.0, 0.5]]])
    alpha, gamma, iou = 0.75, 2.0, 0.6
    loss = L.varifocal_loss(logits, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([iou]),
                            num_boxes=1.0, alpha=alpha, gamma=gamma)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    expected = 0.0
    for x in (0.3, -1.0, 0.5):  # negatives: weight alpha * p^gamma, target 0
        expected += alpha * sig(x) ** gamma * _bce(x, 0.0)
    expected += iou * _bce(2.0, iou)  # the positive: weight = target = IoU
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_varifocal_zero_iou_positive_has_no_weight():
    # A matched query whose box misses its target (IoU 0) is neither pushed up nor treated as a negative.
    logits = torch.tensor([[[4.0]]])
    loss = L.varifocal_loss(logits, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0.0]), 1.0)
    assert loss.item() == 0.0


def test_fgl_by_hand():
    # reg_max = 2 -> 3 bins. Edge 1 targets bin 0.25 (0.75 on bin 0, 0.25 on bin 1); edge 2 targets bin 1.5.
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.4, 0.1]])
    log_p = [[x - math.log(sum(math.exp(v) for v in row)) for x in row] for row in logits.tolist()]
    bins = torch.tensor([0.25, 1.5])
    w_right = torch.tensor([0.25, 0.5])
    w_left = torch.tensor([0.75, 0.5])
    # The loss takes whole boxes (4 edges); pad with two edges that have zero weights.
    logits4 = torch.cat([logits, torch.zeros(2, 3)])
    bins4 = torch.cat([bins, torch.zeros(2)])
    loss = L.fine_grained_localization_loss(logits4, bins4, torch.cat([w_right, torch.zeros(2)]),
                                            torch.cat([w_left, torch.zeros(2)]), torch.tensor([0.8]), num_boxes=2.0)
    expected = -(0.75 * log_p[0][0] + 0.25 * log_p[0][1]) - (0.5 * log_p[1][1] + 0.5 * log_p[1][2])
    assert math.isclose(loss.item(), 0.8 * expected / 2, rel_tol=1e-5)


def test_ddf_by_hand():
    # Two edges with two bins each: edge 0 matched (weight 0.9), edge 1 unmatched (weight 0.4).
    student = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    temperature = 2.0

    def softmax(row):
        e = [math.exp(v / temperature) for v in row]
        return [v / sum(e) for v in e]

    def kl(t_row, s_row):
        p, q = softmax(t_row), softmax(s_row)
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    pos = 0.9 * temperature**2 * kl([1.0, 0.0], [0.0, 1.0])
    neg = 0.4 * temperature**2 * kl([0.0, 0.0], [2.0, -1.0])
    num_pos, num_neg = 2.0, 6.0
    loss = L.decoupled_distillation_loss(student, teacher, torch.tensor([0.9, 0.4]), torch.tensor([True, False]),
                                         num_pos, num_neg, temperature=temperature)
    assert math.isclose(loss.item(), (pos * num_pos + neg * num_neg) / (num_pos + num_neg), rel_tol=1e-5)


def test_ddf_identical_distributions_is_zero_and_empty_side_is_safe():
    x = torch.randn(8, 5)
    loss = L.decoupled_distillation_loss(x, x.clone(), torch.ones(8), torch.zeros(8, dtype=torch.bool), 0.0, 3.0)
    assert abs(loss.item()) < 1e-6
    empty = L.decoupled_distillation_loss(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5), torch.zeros(0),
                                          torch.zeros(0, dtype=torch.bool), 0.0, 0.0)
    assert empty.item() == 0.0 and empty.requires_grad


def test_focal_by_hand():
    logits = torch.tensor([[[0.5, -0.5]]])
    loss = L.sigmoid_focal_loss(logits, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), 1.0, 0.25, 2.0)
    p0, p1 = 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))
    expected = 0.75 * p0**2 * _bce(0.5, 0.0) + 0.25 * (1 - p1) ** 2 * _bce(-0.5, 1.0)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------- gradient checks


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_gradcheck_varifocal():
    torch.manual_seed(0)
    logits = _f64(2, 5, 3)
    b, q, c = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 4]), torch.tensor([2, 0, 1])
    ious = torch.tensor([0.3, 0.7, 0.9], dtype=torch.float64)
    # VFL's negative weight alpha * p**gamma is detached by design (a weight, not a target of the gradient), so the
    # finite-difference derivative only matches with gamma = 0, where that weight is constant.
    assert torch.autograd.gradcheck(lambda x: L.varifocal_loss(x, b, q, c, ious, 3.0, gamma=0.0), (logits,))


def test_gradcheck_focal():
    torch.manual_seed(0)
    logits = _f64(1, 4, 3)
    assert torch.autograd.gradcheck(
        lambda x: L.sigmoid_focal_loss(x, torch.tensor([0]), torch.tensor([2]), torch.tensor([1]), 1.0), (logits,))


def _random_boxes(n):
    centre = torch.rand(n, 2, dtype=torch.float64) * 0.5 + 0.25
    size = torch.rand(n, 2, dtype=torch.float64) * 0.3 + 0.1
    return torch.cat([centre, size], 1)


def test_gradcheck_box_losses():
    torch.manual_seed(0)
    pred = _random_boxes(4).requires_grad_()
    tgt = _random_boxes(4)
    assert torch.autograd.gradcheck(lambda x: L.giou_box_loss(x, tgt, 2.0), (pred,))
    assert torch.autograd.gradcheck(lambda x: L.l1_box_loss(x, tgt, 2.0), (pred,))


def test_gradcheck_fgl():
    torch.manual_seed(0)
    corners = _f64(8, 5)  # two boxes, reg_max = 4
    bins = torch.rand(8, dtype=torch.float64) * 3.9
    w_right = bins - bins.floor()
    ious = torch.tensor([0.5, 0.8], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: L.fine_grained_localization_loss(x, bins, w_right, 1 - w_right, ious, 2.0), (corners,))


def test_gradcheck_ddf():
    torch.manual_seed(0)
    student = _f64(12, 5)
    teacher = torch.randn(12, 5, dtype=torch.float64)
    weights = torch.rand(12, dtype=torch.float64)
    matched = torch.tensor([True] * 4 + [False] * 8)
    assert torch.autograd.gradcheck(
        lambda x: L.decoupled_distillation_loss(x, teacher, weights, matched, 2.0, 4.0), (student,))
