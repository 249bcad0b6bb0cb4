"""``RunSettings``: the runtime keys of a config, read once by the trainer.

Defaults live in configs/base/runtime.yml, which every shipped config includes; a key left out of a config (one
written from scratch) or set to null takes the same value here (tests/test_run_settings.py keeps the two equal).
Keys whose null means something (``device``, ``amp_dtype``, ``tuning``, ``early_stopping``) keep it. Sections
(optimizer, schedules, EMA, early stopping, loggers with ``summary_dir``) are read by the builders of their objects.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from dfine.registry import ConfigError

AMP_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class RunSettings:
    """How a run is executed (see TOP_LEVEL_KEYS in dfine/config.py for each key's meaning)."""

    # configs/base/runtime.yml
    output_dir: Path = Path("./output")
    device: str | None = None  # null: cuda when available
    seed: int = 0
    print_freq: int = 100
    checkpoint_freq: int = 12
    checkpoint_every_steps: int = 0
    sync_bn: bool = True
    find_unused_parameters: bool = False
    use_amp: bool = True
    amp_dtype: str | None = None  # null: float16 on CUDA, bfloat16 on the CPU
    compile: bool = False  # torch.compile: dfine/engine/compiling.py
    max_bad_steps: int = 10
    skip_bad_samples: bool = False
    dist_timeout_minutes: float = 30
    tuning: str | None = None
    tuning_class_map: str = "auto"
    # recipe keys (configs/base/optimizer.yml and the size configs); off when a config leaves them out
    clip_max_norm: float = 0.0
    reload_best_at_stop_epoch: bool = True
    early_stopping: dict | None = None
    num_classes: int | None = None  # checked against the data before a model is built

    @classmethod
    def from_config(cls, cfg: dict) -> "RunSettings":
        """The settings of a resolved (validated) config; absent or null keys take the defaults above."""
        values = {}
        for spec in fields(cls):
            value = cfg.get(spec.name)
            values[spec.name] = spec.default if value is None else value
        values["output_dir"] = Path(values["output_dir"] or cls.output_dir)
        for name in ("seed", "print_freq", "checkpoint_freq", "checkpoint_every_steps", "max_bad_steps"):
            values[name] = int(values[name])
        values["clip_max_norm"] = float(values["clip_max_norm"])
        return cls(**values)

    def amp(self, device: torch.device) -> tuple[bool, torch.dtype]:
        """(enabled, dtype) for autocast. float16 is paired with a GradScaler by the trainer."""
        name = self.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")
        if name not in AMP_DTYPES:
            raise ConfigError(f"`amp_dtype` must be bfloat16 or float16, not {name!r}")
        return bool(self.use_amp), AMP_DTYPES[name]

