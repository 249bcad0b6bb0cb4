"""The typed run settings (dfine/settings.py): every top-level key declared, the shipped configs and defaults accepted,
wrong types and ranges refused with `<dotted key>: expected ..., got ...`, and constructor annotations applied."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

import dfine
from dfine.config import TOP_LEVEL_KEYS, ConfigError, safe_load_yaml
from dfine.devices import DeviceError, amp_note, check_device
from dfine.engine.distributed import resolve_device
from dfine.settings import RUNTIME_SETTINGS, SECTION_SETTINGS, describe, matches

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "dfine_n_demo.yml"


def test_every_top_level_key_has_a_declared_type():
    """A new key in TOP_LEVEL_KEYS must get its type and range in RUNTIME_SETTINGS (and no entry may be orphaned)."""
    undeclared = sorted(set(TOP_LEVEL_KEYS) - set(RUNTIME_SETTINGS))
    assert not undeclared, f"declare these in dfine/settings.py RUNTIME_SETTINGS: {undeclared}"
    orphaned = sorted(set(RUNTIME_SETTINGS) - set(TOP_LEVEL_KEYS))
    assert not orphaned, f"RUNTIME_SETTINGS keys that are no documented top-level key: {orphaned}"
    for pattern in SECTION_SETTINGS:
        assert pattern.split(".")[0] in TOP_LEVEL_KEYS, pattern


def test_runtime_defaults_fit_their_declaration():
    defaults = safe_load_yaml((REPO / "configs" / "base" / "runtime.yml").read_text())
    for key, value in defaults.items():
        assert RUNTIME_SETTINGS[key].accepts(value), (key, value)


@pytest.mark.parametrize("override, key, got", [
    ("epochs=many", "epochs", "'many'"),
    ("epochs=2.5", "epochs", "2.5"),
    ("optimizer.lr=-1", "optimizer.lr", "-1"),
    ("optimizer.lr=0", "optimizer.lr", "0"),
    ("num_classes=0", "num_classes", "0"),
    ("eval_spatial_size=[640]", "eval_spatial_size", "[640]"),
    ("eval_spatial_size=[-64,64]", "eval_spatial_size", "[-64, 64]"),
    ("train_dataloader.total_batch_size=0", "train_dataloader.total_batch_size", "0"),
    ("val_dataloader.num_workers=-1", "val_dataloader.num_workers", "-1"),
    ("amp_dtype=half", "amp_dtype", "'half'"),
    ("use_amp=1", "use_amp", "1"),
    ("sync_bn=yes please", "sync_bn", "'yes please'"),
    ("clip_max_norm=-0.1", "clip_max_norm", "-0.1"),
    ("ema.decay=1.5", "ema.decay", "1.5"),
    ("optimizer.params.0.weight_decay=-2", "optimizer.params.0.weight_decay", "-2"),
    ("device=gpu0", "device", "'gpu0'"),
    ("stop_epoch=-1", "stop_epoch", "-1"),
    ("model.decoder.num_points=[3,x]", "model.decoder.num_points", "[3, 'x']"),
    ("model.backbone.pretrained=maybe", "model.backbone.pretrained", "'maybe'"),
    ("lr_scheduler.milestones=10", "lr_scheduler.milestones", "10"),
    ("optimizer.betas=[0.9]", "optimizer.betas", "[0.9]"),
])
def test_wrong_value_names_key_expectation_and_value(override, key, got):
    with pytest.raises(ConfigError) as info:
        dfine.load_config(DEMO, [override])
    message = str(info.value)
    assert message.startswith(f"{key}: expected "), message
    assert message.endswith(f"got {got}"), message


@pytest.mark.parametrize("override", [
    "model.decoder.reg_scale=4",          # an int where a float is annotated
    "model.encoder.eval_spatial_size=null",  # Optional
    "amp_dtype=null", "stop_epoch=6", "stop_epoch=0", "clip_max_norm=0", "optimizer.betas=[0.8, 0.99]",
    "lr_scheduler.milestones=[3, 5]", "model.decoder.num_points=4", "ema.restart_decay=null", "device=cuda:1",
])
def test_right_values_pass(override):
    dfine.load_config(DEMO, [override])


def test_every_shipped_config_passes():
    for path in sorted((REPO / "configs").glob("*.yml")):
        dfine.load_config(path)


def test_annotation_matching():
    assert matches(3, float) and not matches(True, float) and not matches(True, int) and matches(True, bool)
    assert matches(None, Optional[int]) and matches(None, int | None) and not matches("a", int | None)
    assert matches([1, 2], Sequence[int]) and not matches("12", Sequence[int]) and not matches([1.5], list[int])
    assert matches([1, 2.5], tuple[float, float]) and not matches([1], tuple[float, float])
    assert matches([1, 2, 3], tuple[int, ...]) and matches({"a": 1}, dict) and not matches([1], dict)
    assert not matches({"a": 1}, torch.nn.Module)  # only a `type:` section builds a module; checked before matching
    assert describe(int | None) == "int or null" and describe(Sequence[int]) == "a list of int"


def test_devices():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="devices on this machine: cpu"):
        check_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available.*devices here: cpu"):
            check_device("cuda")
        with pytest.raises(DeviceError):
            resolve_device("cuda")  # the trainer's own entry point says the same
    assert amp_note(torch.device("cpu"), True, "float16") and not amp_note(torch.device("cpu"), True, "bfloat16")
    assert not amp_note(torch.device("cpu"), False, "float16")
