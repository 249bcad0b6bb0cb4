"""load_checkpoint: every layout we read (ours, the reference's releases, DDP) and its error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dfine.checkpoint import CheckpointError, load_checkpoint


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), key


@pytest.mark.parametrize("layout", ["model", "ema", "bare", "module_prefix"])
def test_layouts(tmp_path, layout):
    source = small_model(0)
    state = source.state_dict()
    if layout == "model":
        checkpoint = {"model": state, "last_epoch": 3}
    elif layout == "ema":
        # EMA weights win over the raw ones, as in the reference tools.
        checkpoint = {"model": small_model(1).state_dict(), "ema": {"module": state, "updates": 10}}
    elif layout == "bare":
        checkpoint = state
    else:
        checkpoint = {"model": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    target = small_model(2)
    report = load_checkpoint(target, path)
    assert report.ok and sorted(report.loaded) == sorted(state)
    assert_same_weights(source, target)
    # the same from a checkpoint dict the caller has already read
    again = small_model(3)
    report = load_checkpoint(again, torch.load(path, weights_only=True), source="ckpt.pth")
    assert report.ok and report.source.startswith("ckpt.pth [")
    assert_same_weights(source, again)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    state = small_model(0).state_dict()
    state["2.weight"] = torch.zeros(5, 4)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"2\.weight: checkpoint \[5, 4\] vs model \[2, 4\]"):
        load_checkpoint(small_model(1), path)


def test_missing_and_unexpected_keys(tmp_path):
    state = small_model(0).state_dict()
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="missing from checkpoint: 0.bias") as info:
        load_checkpoint(small_model(1), path)
    assert "extra.weight" in str(info.value)
    # Not strict: the fitting keys load, the others are reported.
    target = small_model(1)
    report = load_checkpoint(target, path, strict=False)
    assert report.missing == ["0.bias"] and report.unexpected == ["extra.weight"]
    assert torch.equal(target[0].weight, state["0.weight"])


def test_unreadable_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(small_model(0), tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(small_model(0), path)
    path = tmp_path / "empty.pth"
    torch.save({"optimizer": {"lr": 1}}, path)
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(small_model(0), path)


def test_reference_release_layout(reference_dir):
    """The reference solver's {'date', 'last_epoch', 'model', 'ema'} file loads into a state dict of its keys."""
    import json

    keys = json.loads((reference_dir / "state_dict_keys_n.json").read_text())
    checkpoint = torch.load(reference_dir / "dfine_n_perturbed.pth", weights_only=True)
    assert set(checkpoint) >= {"model", "ema"}
    from dfine.checkpoint import extract_state_dict

    state, where = extract_state_dict(checkpoint)
    assert where == "ema.module"
    assert [k for k, _, _ in keys] == list(state)


def test_mismatch_names_the_overrides_that_rebuild_the_checkpoints_model(tmp_path):
    """Weights of a D-FINE-N built with other settings: the error names the overrides, and a model rebuilt
    with exactly those overrides loads the file."""
    import dfine

    config = Path(__file__).resolve().parents[1] / "configs" / "dfine_n_coco.yml"
    settings = ["model.decoder.dim_feedforward=256", "num_classes=3", "model.backbone.use_lab=false",
                "model.decoder.num_layers=4"]
    other = dfine.build_model(dfine.load_config(config, settings), load_pretrained=False)
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    standard = dfine.build_model(dfine.load_config(config), load_pretrained=False)
    with pytest.raises(CheckpointError, match="rebuild the model with the config overrides") as caught:
        load_checkpoint(standard, path)
    advice = str(caught.value).split("config overrides\n", 1)[1].splitlines()[0].split()
    assert sorted(advice) == sorted(settings)
    rebuilt = dfine.build_model(dfine.load_config(config, advice), load_pretrained=False)
    assert load_checkpoint(rebuilt, path).ok
