"""Optimizer parameter groups (against the reference's recorded groups), warm-up, schedules and EMA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dfine.config import _read_with_includes
from dfine.engine.build import build_optimizer
from dfine.engine.ema import ModelEMA
from dfine.engine.optim import FlatCosineLR, LinearWarmup, build_param_groups
from dfine.registry import ConfigError

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def shell_model(trainable: list[str], frozen: list[str] = ()) -> nn.Module:
    """A module whose named_parameters() are exactly ``trainable`` (then ``frozen``), in that order."""
    root = nn.Module()
    for names, grad in ((trainable, True), (frozen, False)):
        for name in names:
            *path, leaf = name.split(".")
            node = root
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, nn.Module())
                node = getattr(node, part)
            node.register_parameter(leaf, nn.Parameter(torch.zeros(1), requires_grad=grad))
    return root


def test_param_groups_match_reference_n():
    path = REFERENCE / "train_ref_n_perturbed_train640.pt"
    if not path.is_file():
        pytest.skip(f"reference data not found at {path}")
    ref_groups = torch.load(path, weights_only=True)["optimizer_param_groups"]
    # the model's parameters in module order: the reference listed each group in named_parameters() order
    import json

    order = [e["key"] if isinstance(e, dict) else e[0] for e in json.loads((REFERENCE / "state_dict_keys_n.json").read_text())]
    in_groups = {n for g in ref_groups for n in g["params"]}
    model = shell_model([n for n in order if n in in_groups])
    cfg = _read_with_includes(REPO / "configs" / "dfine_n_coco.yml", chain=())
    optimizer = build_optimizer({"optimizer": cfg["optimizer"]}, model)
    assert len(optimizer.param_groups) == len(ref_groups)
    for ours, ref in zip(optimizer.param_groups, ref_groups):
        assert ours["names"] == ref["params"]  # same members, same order (the empty quirk group included)
        for key in ("lr", "weight_decay", "eps"):
            assert ours[key] == pytest.approx(ref[key])
        assert list(ours["betas"]) == pytest.approx(ref["betas"])
    assert optimizer.param_groups[1]["names"] == []  # `(?=.*norm|bn)` matches no backbone BatchNorm parameter


def test_param_groups_regex_semantics():
    model = shell_model(["backbone.conv.weight", "backbone.bn.weight", "encoder.norm.bias", "decoder.fc.weight"], ["decoder.up"])
    groups = build_param_groups(model, [{"params": "^(?=.*backbone)(?!.*norm).*$", "lr": 1.0}, {"params": "norm", "weight_decay": 0.0}])
    assert [g["names"] for g in groups] == [
        ["backbone.conv.weight", "backbone.bn.weight"], ["encoder.norm.bias"], ["decoder.fc.weight"],
    ]
    with pytest.raises(ConfigError, match="matches both group 0 and group 1"):
        build_param_groups(model, [{"params": "backbone"}, {"params": "conv"}])
    with pytest.raises(ConfigError, match="invalid regex"):
        build_param_groups(model, [{"params": "("}])


def test_linear_warmup_then_main_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.4}, {"params": [], "lr": 0.1}], lr=0.1)
    warm = LinearWarmup(opt, warmup_duration=4)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        warm.step()
    assert [s[0] for s in seen] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert [s[1] for s in seen] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert warm.finished()
    restored = LinearWarmup(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4), 4)
    restored.load_state_dict(warm.state_dict())
    assert restored.finished() and restored.last_step == warm.last_step


def test_flat_cosine_shape():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = FlatCosineLR(opt, lr_gamma=0.5, flat_epoch=2, iter_per_epoch=10, total_epochs=10, no_aug_epoch=2)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[20] == 1.0  # flat
    assert lrs[50] == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 30 / 60)))  # mid-cosine
    assert lrs[80] == lrs[99] == pytest.approx(0.5)  # floor through the no-augmentation epochs
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_ema_ramp_and_restart_decay_takes_effect():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = ModelEMA(model, decay=0.9, warmups=2, restart_decay=0.5)
    model.weight.data.fill_(1.0)
    ema.update(model)
    d1 = 0.9 * (1 - math.exp(-1 / 2))
    assert ema.module.weight.item() == pytest.approx(1 - d1)
    # after restart the next update uses the new decay (0.5 ramped), not the old one
    ema.restart()
    before = ema.module.weight.item()
    model.weight.data.fill_(3.0)
    ema.update(model)
    d2 = 0.5 * (1 - math.exp(-2 / 2))
    assert ema.module.weight.item() == pytest.approx(d2 * before + (1 - d2) * 3.0)
    assert ema.state_dict()["decay"] == 0.5 and ema.state_dict()["updates"] == 2
    other = ModelEMA(model, decay=0.9, warmups=2)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.updates == 2


def test_ema_averages_batchnorm_statistics_and_skips_integers():
    model = nn.BatchNorm1d(2)
    ema = ModelEMA(model, decay=0.5, warmups=0)
    model.running_mean.fill_(2.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model)
    assert ema.module.running_mean.tolist() == [1.0, 1.0]
    assert ema.module.num_batches_tracked.item() == 0
