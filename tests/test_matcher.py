"""HungarianMatcher, the GO-LSD union of assignments and the denoising assignment."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dfine.losses.matcher import HungarianMatcher, denoising_assignment, union_assignment

WEIGHTS = {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}


def make_matcher():
    return HungarianMatcher(WEIGHTS, use_focal_loss=True, alpha=0.25, gamma=2.0)


def _independent_cost(logit, box, label_logit_idx, tgt_box):
    """The matching cost of one (query, target) pair, written out with the math module."""
    p = 1 / (1 + math.exp(-logit[label_logit_idx]))
    pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
    neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(a - b) for a, b in zip(box, tgt_box))

    def xyxy(b):
        return (b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2)

    a, b = xyxy(box), xyxy(tgt_box)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    giou = inter / union - (enclosing - union) / enclosing
    return 2 * (pos - neg) + 5 * l1 - 2 * giou


def _random_batch(seed, num_queries, sizes, num_classes=4):
    g = torch.Generator().manual_seed(seed)
    batch = len(sizes)
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes, generator=g),
        "pred_boxes": torch.cat([torch.rand(batch, num_queries, 2, generator=g) * 0.6 + 0.2,
                                 torch.rand(batch, num_queries, 2, generator=g) * 0.3 + 0.05], -1),
    }
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                    torch.rand(n, 2, generator=g) * 0.3 + 0.05], -1)} for n in sizes]
    return outputs, targets


def test_obvious_assignment():
    # Query 0 sits on target 1, query 1 on target 0, query 2 far from both.
    outputs = {
        "pred_logits": torch.tensor([[[3.0, -3.0], [-3.0, 3.0], [-3.0, -3.0]]]),
        "pred_boxes": torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.5, 0.9, 0.05, 0.05]]]),
    }
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]])}]
    (queries, tgts), = make_matcher()(outputs, targets)
    assert dict(zip(queries.tolist(), tgts.tolist())) == {0: 1, 1: 0}
    assert queries.dtype == torch.int64 and tgts.dtype == torch.int64


@pytest.mark.parametrize("seed", range(4))
def test_optimal_against_brute_force(seed):
    outputs, targets = _random_batch(seed, num_queries=5, sizes=[3, 2])
    result = make_matcher()(outputs, targets)
    for b, (queries, tgts) in enumerate(result):
        logits, boxes = outputs["pred_logits"][b].tolist(), outputs["pred_boxes"][b].tolist()
        labels, tgt_boxes = targets[b]["labels"].tolist(), targets[b]["boxes"].tolist()
        n = len(labels)

        def cost(q, t):
            return _independent_cost(logits[q], boxes[q], labels[t], tgt_boxes[t])

        best = min(sum(cost(q, t) for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), n))
        found = sum(cost(q, t) for q, t in zip(queries.tolist(), tgts.tolist()))
        assert sorted(tgts.tolist()) == list(range(n))
        assert found == pytest.approx(best, rel=1e-5, abs=1e-5)


def test_images_without_targets():
    outputs, targets = _random_batch(0, num_queries=6, sizes=[0, 3])
    result = make_matcher()(outputs, targets)
    assert result[0][0].numel() == 0 and result[0][1].numel() == 0
    assert len(result[1][0]) == 3
    outputs, targets = _random_batch(1, num_queries=6, sizes=[0, 0])
    assert all(q.numel() == 0 and t.numel() == 0 for q, t in make_matcher()(outputs, targets))


def test_match_many_equals_one_by_one():
    layers = [_random_batch(s, num_queries=7, sizes=[2, 4])[0] for s in range(3)]
    _, targets = _random_batch(0, num_queries=7, sizes=[2, 4])
    matcher = make_matcher()
    together = matcher.match_many(layers, targets)
    for layer, joint in zip(layers, together):
        for (q1, t1), (q2, t2) in zip(matcher(layer, targets), joint):
            assert torch.equal(q1, q2) and torch.equal(t1, t2)


def test_rejects_all_zero_costs_and_missing_keys():
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher({"cost_class": 0, "cost_bbox": 0, "cost_giou": 0})
    with pytest.raises(ValueError, match="cost_giou"):
        HungarianMatcher({"cost_class": 1, "cost_bbox": 1})


def _pairs(q, t):
    return (torch.tensor(q, dtype=torch.int64), torch.tensor(t, dtype=torch.int64))


def test_union_majority_wins_and_queries_unique():
    # Query 0 goes to target 1 in two layers and to target 0 in one: it keeps target 1. Query 2 appears once.
    layers = [[_pairs([0], [1])], [_pairs([0], [0])], [_pairs([0, 2], [1, 0])]]
    (queries, tgts), = union_assignment(layers)
    assert dict(zip(queries.tolist(), tgts.tolist())) == {0: 1, 2: 0}
    assert queries.tolist()[0] == 0  # the most agreed pair comes first


def test_union_empty():
    layers = [[_pairs([], []), _pairs([1], [0])], [_pairs([], []), _pairs([1], [0])]]
    union = union_assignment(layers)
    assert union[0][0].numel() == 0
    assert union[1][0].tolist() == [1] and union[1][1].tolist() == [0]


def test_denoising_assignment():
    meta = {"dn_positive_idx": [torch.tensor([0, 1, 6, 7]), torch.zeros(0, dtype=torch.int64)], "dn_num_group": 2}
    targets = [{"labels": torch.tensor([3, 4])}, {"labels": torch.zeros(0, dtype=torch.int64)}]
    result = denoising_assignment(meta, targets)
    assert result[0][0].tolist() == [0, 1, 6, 7] and result[0][1].tolist() == [0, 1, 0, 1]
    assert result[1][0].numel() == 0
    with pytest.raises(ValueError, match="image 0"):
        denoising_assignment({"dn_positive_idx": [torch.tensor([0, 1, 6])], "dn_num_group": 2}, targets[:1])


def _same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("variant", ["perturbed", "random"])
def test_reference_assignments(reference_dir, variant):
    """Every Hungarian assignment, the union and the denoising indices equal the reference's recorded ones."""
    outputs = torch.load(reference_dir / f"train_outputs_n_{variant}_train640.pt", weights_only=True)
    ref = torch.load(reference_dir / f"train_ref_n_{variant}_train640.pt", weights_only=True)
    targets = torch.load(reference_dir / "inputs.pt", weights_only=True)["targets_640"]
    heads = [outputs] + outputs["aux_outputs"] + [outputs["pre_outputs"]] + outputs["enc_aux_outputs"]
    names = ["main"] + [f"aux_{i}" for i in range(len(outputs["aux_outputs"]))] + ["pre"] + [
        f"enc_{i}" for i in range(len(outputs["enc_aux_outputs"]))]
    assert set(names) == set(ref["matcher_indices"])
    assignments = make_matcher().match_many(heads, targets)
    for name, assignment in zip(names, assignments):
        assert _same(assignment, ref["matcher_indices"][name]), name
    assert _same(union_assignment(assignments), ref["go_indices"])
    assert _same(denoising_assignment(outputs["dn_meta"], targets), ref["dn_indices"])
