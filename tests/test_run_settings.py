"""RunSettings: the runtime keys read once, with configs/base/runtime.yml as the one place of their defaults."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch

from dfine.config import TOP_LEVEL_KEYS, load_config, safe_load_yaml
from dfine.engine.run_settings import RunSettings
from dfine.registry import ConfigError
from helpers import DEMO_CONFIG

RUNTIME_YML = Path(__file__).resolve().parents[1] / "configs" / "base" / "runtime.yml"


def test_defaults_are_the_runtime_yml_values():
    runtime = safe_load_yaml(RUNTIME_YML.read_text())
    shared = [spec for spec in fields(RunSettings) if spec.name in runtime]
    assert len(shared) >= 14
    for spec in shared:
        expected = Path(runtime[spec.name]) if spec.name == "output_dir" else runtime[spec.name]
        assert spec.default == expected, spec.name
    assert all(spec.name in TOP_LEVEL_KEYS for spec in fields(RunSettings))


def test_read_from_a_config_and_absent_or_null_keys_take_the_defaults():
    cfg = load_config(DEMO_CONFIG, ["print_freq=7", "checkpoint_every_steps=5", "dist_timeout_minutes=2.5"])
    settings = RunSettings.from_config(cfg)
    assert (settings.print_freq, settings.checkpoint_freq, settings.checkpoint_every_steps) == (7, 3, 5)
    assert settings.dist_timeout_minutes == 2.5 and settings.use_amp is False and settings.device == "cpu"
    assert settings.output_dir == Path(cfg["output_dir"]) and settings.num_classes == 6
    assert settings.clip_max_norm == 0.1 and settings.reload_best_at_stop_epoch is True
    bare = RunSettings.from_config({"print_freq": None, "output_dir": None})
    assert bare == RunSettings() and bare.print_freq == 100 and bare.output_dir == Path("output")


def test_amp_dtype_follows_the_device_unless_set():
    assert RunSettings(amp_dtype=None).amp(torch.device("cpu")) == (True, torch.bfloat16)
    assert RunSettings(amp_dtype=None, use_amp=False).amp(torch.device("cuda")) == (False, torch.float16)
    assert RunSettings(amp_dtype="bf16").amp(torch.device("cuda"))[1] == torch.bfloat16
    with pytest.raises(ConfigError, match="amp_dtype"):
        RunSettings(amp_dtype="int8").amp(torch.device("cpu"))
