"""Engine builders: optimizer, schedules and EMA from the config (the engine's counterpart of dfine/builders.py;
the only engine code that reads config sections)."""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

from dfine.engine.ema import ModelEMA
from dfine.engine.optim import build_param_groups
from dfine.engine.phases import PhaseSchedule
from dfine.registry import EMAS, OPTIMIZERS, SCHEDULERS, ConfigError

logger = logging.getLogger(__name__)


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg['optimizer']``: ``{type: AdamW, params: [{params: regex, lr: ...}, ...], lr, betas, weight_decay}``."""
    section = cfg.get("optimizer")
    if not isinstance(section, dict) or "type" not in section:
        raise ConfigError("the config has no `optimizer` section (a mapping with `type:`, e.g. AdamW)")
    section = copy.deepcopy(section)
    groups = build_param_groups(model, section.pop("params", None))
    return OPTIMIZERS.build(section, "optimizer", params=groups)


def build_schedulers(cfg: dict, optimizer: torch.optim.Optimizer, schedule: PhaseSchedule):
    """(main lr scheduler or None, warm-up scheduler or None). The warm-up is built last so it starts from the
    lrs the main scheduler set."""
    main = None
    section = cfg.get("lr_scheduler")
    if section:
        provided = {"optimizer": optimizer}
        if getattr(SCHEDULERS.get(section.get("type", ""), "lr_scheduler"), "step_per_iteration", False):
            provided.update(
                iter_per_epoch=schedule.steps_per_epoch, total_epochs=schedule.epochs, no_aug_epoch=schedule.no_aug_epochs
            )
        main = SCHEDULERS.build(section, "lr_scheduler", **provided)
    warmup = None
    section = cfg.get("lr_warmup_scheduler")
    if section:
        warmup = SCHEDULERS.build(section, "lr_warmup_scheduler", optimizer=optimizer)
    return main, warmup


def warmup_steps(cfg: dict) -> int:
    section = cfg.get("lr_warmup_scheduler") or {}
    return int(section.get("warmup_duration", 0) or 0)


def build_ema(cfg: dict, model: nn.Module) -> ModelEMA | None:
    """``cfg['ema']`` when ``use_ema`` is true, else None."""
    if not cfg.get("use_ema", False):
        return None
    section = cfg.get("ema") or {"type": "ModelEMA"}
    return EMAS.build(section, "ema", model=model)
