"""DFINECriterion: parity with the reference loss dict, empty targets, no mutation of its input, distributed
normalisation, and reuse for RT-DETRv2's objective."""

from __future__ import annotations

import copy
import os
import socket
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import dfine
from dfine.losses.criterion import DFINECriterion
from dfine.losses.matcher import HungarianMatcher

REPO_ROOT = Path(__file__).resolve().parents[1]
REG_MAX = 32


def criterion_from_base(tmp_path: Path):
    """The criterion of configs/base/dfine_criterion.yml with num_classes 80 (independent of the model configs)."""
    path = tmp_path / "criterion.yml"
    path.write_text(textwrap.dedent(f"""\
        __include__: [{REPO_ROOT / 'configs' / 'base' / 'dfine_criterion.yml'}]
        num_classes: 80
        """))
    return dfine.build_criterion(dfine.load_config(path))


def load_reference(reference_dir: Path, variant: str):
    outputs = torch.load(reference_dir / f"train_outputs_n_{variant}_train640.pt", weights_only=True)
    ref = torch.load(reference_dir / f"train_ref_n_{variant}_train640.pt", weights_only=True)
    targets = torch.load(reference_dir / "inputs.pt", weights_only=True)["targets_640"]
    return outputs, targets, ref


def assert_matches_reference(losses: dict, ref: dict):
    expected = ref["loss_dict"]
    assert list(losses) == list(expected)
    for key, value in expected.items():
        assert torch.isfinite(losses[key])
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-12), key
    total = sum(losses.values())
    assert total.item() == pytest.approx(ref["loss_total"].item(), rel=1e-5)


@pytest.mark.parametrize("variant", ["perturbed", "random"])
def test_reference_loss_dict_base_config(reference_dir, tmp_path, variant):
    outputs, targets, ref = load_reference(reference_dir, variant)
    losses = criterion_from_base(tmp_path)(outputs, targets)
    assert len(losses) == 38  # 4 final + 2 x 5 intermediate + 3 first-layer + 3 encoder + 3 x 5 denoising + 3 dn-first
    assert_matches_reference(losses, ref)


@pytest.mark.parametrize("variant", ["perturbed", "random"])
def test_reference_loss_dict_n_config(reference_dir, variant):
    """The acceptance check on the released N config (needs the model types to be registered to load)."""
    outputs, targets, ref = load_reference(reference_dir, variant)
    criterion = dfine.build_criterion(dfine.load_config(REPO_ROOT / "configs" / "dfine_n_coco.yml"))
    assert_matches_reference(criterion(outputs, targets), ref)


def _snapshot(value):
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value.clone() if torch.is_tensor(value) else copy.deepcopy(value)


def _assert_same(a, b, path="outputs"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys changed"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_outputs_dict_is_not_modified(reference_dir, tmp_path):
    outputs, targets, _ = load_reference(reference_dir, "perturbed")
    before = _snapshot(outputs)
    criterion_from_base(tmp_path)(outputs, targets)
    _assert_same(outputs, before)


# ------------------------------------------------------------------------------ synthetic D-FINE outputs


def synthetic_outputs(sizes, num_queries=6, num_layers=3, num_groups=2, seed=0, requires_grad=True):
    """A D-FINE-shaped train-mode outputs dict for a batch whose images hold ``sizes`` targets, with a denoising
    group laid out as the reference does (num_groups x [positives, negatives], each max(sizes) queries)."""
    g = torch.Generator().manual_seed(seed)
    batch, classes, bins = len(sizes), 80, 4 * (REG_MAX + 1)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    def boxes(*shape):
        centres = torch.rand(*shape, 2, generator=g) * 0.6 + 0.2
        raw = torch.cat([centres, torch.rand(*shape, 2, generator=g) * 0.3 + 0.05], -1)
        return raw.requires_grad_(requires_grad)

    def layer_outputs(queries, layers):
        ref_points = boxes(batch, queries).detach()
        outs = [{"pred_logits": leaf(batch, queries, classes), "pred_boxes": boxes(batch, queries),
                 "pred_corners": leaf(batch, queries, bins), "ref_points": ref_points} for _ in range(layers)]
        for out in outs:
            out["teacher_corners"] = outs[-1]["pred_corners"]
            out["teacher_logits"] = outs[-1]["pred_logits"]
        return outs

    layers = layer_outputs(num_queries, num_layers)
    final = {k: v for k, v in layers[-1].items() if not k.startswith("teacher")}
    outputs = {**final, "up": torch.tensor([0.5]), "reg_scale": torch.tensor([4]),
               "aux_outputs": layers[:-1],
               "pre_outputs": {"pred_logits": leaf(batch, num_queries, classes),
                               "pred_boxes": boxes(batch, num_queries)},
               "enc_aux_outputs": [{"pred_logits": leaf(batch, num_queries, classes),
                                    "pred_boxes": boxes(batch, num_queries)}],
               "enc_meta": {"class_agnostic": False}}
    max_n = max(sizes)
    dn_queries = num_groups * 2 * max_n
    outputs["dn_outputs"] = layer_outputs(dn_queries, num_layers)
    outputs["dn_pre_outputs"] = {"pred_logits": leaf(batch, dn_queries, classes),
                                 "pred_boxes": boxes(batch, dn_queries)}
    positive = [torch.cat([grp * 2 * max_n + torch.arange(n) for grp in range(num_groups)]) if n else
                torch.zeros(0, dtype=torch.int64) for n in sizes]
    outputs["dn_meta"] = {"dn_positive_idx": tuple(positive), "dn_num_group": num_groups,
                          "dn_num_split": [dn_queries, num_queries]}
    targets = [{"labels": torch.randint(0, classes, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                    torch.rand(n, 2, generator=g) * 0.3 + 0.05], -1)} for n in sizes]
    return outputs, targets


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif torch.is_tensor(value) and value.requires_grad:
        yield value


@pytest.mark.parametrize("sizes", [[3, 2], [0, 3], [0, 0]], ids=["full", "one-empty-image", "all-empty"])
def test_empty_targets_finite_and_same_keys(tmp_path, sizes):
    criterion = criterion_from_base(tmp_path)
    reference_keys = list(criterion(*synthetic_outputs([3, 2], requires_grad=False)))
    outputs, targets = synthetic_outputs(sizes)
    losses = criterion(outputs, targets)
    assert list(losses) == reference_keys
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for leaf in _leaves(outputs):
        assert leaf.grad is None or torch.isfinite(leaf.grad).all()
    if sum(sizes) == 0:
        # Nothing to match: only the negatives' classification and the unmatched queries' distillation remain.
        assert all(v.item() == 0 for k, v in losses.items() if not k.startswith(("loss_vfl", "loss_ddf")))
        assert losses["loss_ddf_aux_0"].item() > 0


def test_final_layer_ddf_is_exact_zero(tmp_path):
    losses = criterion_from_base(tmp_path)(*synthetic_outputs([2, 1]))
    assert losses["loss_ddf_dn_2"].item() == 0.0
    assert losses["loss_ddf_aux_0"].item() > 0.0
    assert "loss_ddf" not in losses  # the final layer has no teacher


def test_bad_targets_are_named(tmp_path):
    criterion = criterion_from_base(tmp_path)
    outputs, targets = synthetic_outputs([2, 1], requires_grad=False)
    targets[1]["labels"] = torch.tensor([80])
    with pytest.raises(ValueError, match=r"\[0, 80\)"):
        criterion(outputs, targets)
    targets[1] = {"labels": torch.tensor([1])}
    with pytest.raises(KeyError, match="target 1"):
        criterion(outputs, targets)


# ------------------------------------------------------------------------------ distributed normalisation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, base_config, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        criterion = dfine.build_criterion(dfine.load_config(base_config))
        # Rank 0 has 5 targets, rank 1 none at all: both must run the same collectives and report the same keys.
        sizes = [3, 2] if rank == 0 else [0, 0]
        losses = criterion(*synthetic_outputs(sizes, requires_grad=False))
        keys = [None, None]
        dist.all_gather_object(keys, list(losses))
        results[rank] = {"keys_agree": keys[0] == keys[1], "losses": {k: v.item() for k, v in losses.items()}}
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree_and_average_num_boxes(tmp_path):
    config = tmp_path / "criterion.yml"
    config.write_text(f"__include__: [{REPO_ROOT / 'configs' / 'base' / 'dfine_criterion.yml'}]\nnum_classes: 80\n")
    single = dfine.build_criterion(dfine.load_config(config))(*synthetic_outputs([3, 2], requires_grad=False))
    manager = mp.Manager()
    results = manager.dict()
    context = mp.start_processes(_distributed_worker, args=(2, _free_port(), str(config), results), nprocs=2,
                                 join=False, start_method="spawn")
    for process in context.processes:
        process.join(timeout=120)
    assert all(not p.is_alive() for p in context.processes), "a rank hung in a collective"
    assert all(p.exitcode == 0 for p in context.processes)
    assert results[0]["keys_agree"] and results[1]["keys_agree"]
    # With the other rank contributing no boxes, every box count averages to half of rank 0's own, so each term
    # normalised by a box count doubles; DDF is a weighted mean and does not change.
    for key, value in single.items():
        factor = 1.0 if key.startswith("loss_ddf") else 2.0
        assert results[0]["losses"][key] == pytest.approx(factor * value.item(), rel=1e-5, abs=1e-7), key


# ------------------------------------------------------------------------------ RT-DETRv2 reuse


def test_rtdetrv2_objective_with_the_same_class(reference_dir):
    """use_union_matching=False gives RT-DETRv2's objective (reference lyuwenyu/RT-DETR rtdetrv2_r18vd)."""
    folder = reference_dir / "rtdetrv2"
    if not (folder / "train_ref_r18_train640.pt").is_file():
        pytest.skip(f"RT-DETRv2 reference data not found in {folder}")
    outputs = torch.load(folder / "train_outputs_r18_train640.pt", weights_only=True)
    ref = torch.load(folder / "train_ref_r18_train640.pt", weights_only=True)
    targets = torch.load(reference_dir / "inputs.pt", weights_only=True)["targets_640"]
    matcher = HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}, use_focal_loss=True)
    criterion = DFINECriterion(matcher, {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2}, ["vfl", "boxes"],
                               alpha=0.75, gamma=2.0, num_classes=80, use_union_matching=False)
    losses = criterion(outputs, targets)
    assert set(losses) == set(ref["loss_dict"])
    for key, value in ref["loss_dict"].items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5), key


def test_class_agnostic_encoder_head(tmp_path):
    """With a class-agnostic query selection the encoder head has one logit and every target is class 0."""
    criterion = criterion_from_base(tmp_path)
    outputs, targets = synthetic_outputs([2, 1], requires_grad=False)
    outputs["enc_meta"] = {"class_agnostic": True}
    enc = outputs["enc_aux_outputs"][0]
    enc["pred_logits"] = enc["pred_logits"][..., :1].contiguous()
    losses = criterion(outputs, targets)
    assert torch.isfinite(losses["loss_vfl_enc_0"]) and losses["loss_vfl_enc_0"].item() > 0
    assert targets[0]["labels"].ne(0).any()  # the caller's labels are left alone
