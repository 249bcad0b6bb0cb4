"""Optimizers with regex parameter groups, and the learning-rate schedules of the reference recipes.

Parameter groups follow the reference configs: each entry of ``optimizer.params`` is a mapping whose ``params``
is a regular expression over parameter names (``re.findall`` semantics: a match anywhere counts) and whose
other keys (``lr``, ``weight_decay``, ...) override the optimizer defaults for the matched parameters.
Parameters matched by no entry form a last group with the defaults. Groups that match nothing are kept (empty),
so group indices stay those of the config; this reproduces the reference exactly, including its N/S quirk where
``(?=.*norm|bn)`` matches no backbone BatchNorm parameter.

Schedules, all stepped by the train loop after each optimizer step:

* ``LinearWarmup`` (``lr_warmup_scheduler``): lr = base * min(1, (k + 1) / warmup_duration) for optimizer step k,
  then leaves the lr alone.
* ``MultiStepLR`` (torch's, ``lr_scheduler``): stepped once per epoch, and only once the warm-up has finished,
  as in the reference.
* ``FlatCosineLR`` (``lr_scheduler``): stepped every optimizer step; flat at base lr for ``flat_epoch`` epochs,
  cosine down to ``lr_gamma * base`` at the start of the no-augmentation phase, flat there to the end; with
  ``warmup_iter`` (DEIM) it starts with a quadratic warm-up of its own instead of ``LinearWarmup``.
"""

from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler

from dfine.registry import OPTIMIZERS, SCHEDULERS, ConfigError

logger = logging.getLogger(__name__)

for _optimizer in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
    OPTIMIZERS.register(_optimizer)
SCHEDULERS.register(torch.optim.lr_scheduler.MultiStepLR)


def build_param_groups(model: nn.Module, group_specs: list[dict] | None, path: str = "optimizer.params") -> list[dict]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Args:
        model: the (un-wrapped) model; names are those of ``model.named_parameters()``.
        group_specs: ``[{"params": regex, **overrides}, ...]`` or None for one group.
    Returns:
        ``[{"params": [tensors], "names": [str], "pattern": regex, **overrides}, ..., {"params": rest, "names": ...}]``.
        ``names`` travels in the group (torch keeps extra keys) so logs and tests can say what went where.
    Raises:
        ConfigError when a regex is invalid or two groups claim the same parameter.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not group_specs:
        return [{"params": [p for _, p in named], "names": [n for n, _ in named]}]
    owner: dict[str, int] = {}
    groups = []
    for index, spec in enumerate(group_specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("params"), str):
            raise ConfigError(f"`{path}.{index}` must be a mapping with `params: <regex over parameter names>`")
        try:
            pattern = re.compile(spec["params"])
        except re.error as err:
            raise ConfigError(f"`{path}.{index}.params`: invalid regex {spec['params']!r} ({err})") from None
        names = [n for n, _ in named if pattern.findall(n)]
        for name in names:
            if name in owner:
                raise ConfigError(
                    f"`{path}`: parameter `{name}` matches both group {owner[name]} and group {index}; "
                    "make the regexes exclusive"
                )
            owner[name] = index
        chosen = set(names)
        groups.append({**spec, "params": [p for n, p in named if n in chosen], "names": names, "pattern": spec["params"]})
    rest = [(n, p) for n, p in named if n not in owner]
    groups.append({"params": [p for _, p in rest], "names": [n for n, _ in rest]})
    return groups


def describe_param_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per group: index, size, lr, weight decay, and its regex."""
    lines = []
    for i, group in enumerate(optimizer.param_groups):
        pattern = group.get("pattern", "(rest)")
        lines.append(
            f"  group {i}: {len(group['params']):4d} tensors  lr={group['lr']:.3g}  "
            f"weight_decay={group.get('weight_decay', 0):.3g}  {pattern}"
        )
    return "\n".join(lines)


@SCHEDULERS.register
class LinearWarmup:
    """Linear learning-rate warm-up over the first ``warmup_duration`` optimizer steps.

    The lr of group g at optimizer step k (k = 0, 1, ...) is ``target_g * min(1, (k + 1) / warmup_duration)``,
    where ``target_g`` is the group's lr when the warm-up was built. Afterwards it no longer touches the lr,
    so the main schedule takes over. Stepped after every optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_duration: int = 500):
        if warmup_duration < 0:
            raise ConfigError(f"lr_warmup_scheduler.warmup_duration must be >= 0, not {warmup_duration}")
        self.optimizer = optimizer
        self.warmup_duration = int(warmup_duration)
        self.target_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = -1
        self.step()

    def factor(self, step: int) -> float:
        if self.warmup_duration == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_duration)

    def step(self) -> None:
        self.last_step += 1
        if self.finished():
            return
        factor = self.factor(self.last_step)
        for group, target in zip(self.optimizer.param_groups, self.target_lrs):
            group["lr"] = target * factor

    def finished(self) -> bool:
        return self.last_step >= self.warmup_duration

    def state_dict(self) -> dict:
        return {"warmup_duration": self.warmup_duration, "target_lrs": list(self.target_lrs), "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.warmup_duration = int(state["warmup_duration"])
        self.target_lrs = list(state["target_lrs"])
        self.last_step = int(state["last_step"])


@SCHEDULERS.register
class FlatCosineLR(LRScheduler):
    """Flat, then cosine decay, then flat at the minimum: stepped every optimizer step.

    With ``T`` optimizer steps in total, ``F = flat_epoch * iter_per_epoch`` and ``N = no_aug_epoch *
    iter_per_epoch``, the lr of a group with base lr ``b`` at step t is ``b`` for t <= F, ``b * lr_gamma`` for
    t >= T - N, and in between ``b * (lr_gamma + (1 - lr_gamma) * (1 + cos(pi * (t - F) / (T - F - N))) / 2)``.
    With ``warmup_iter`` W > 0 (DEIM's schedule) the steps t <= W instead use ``b * (t / W) ** 2``; without it a
    separate linear warm-up (``lr_warmup_scheduler``) may override the first steps. The trainer fills
    ``iter_per_epoch``, ``total_epochs`` and ``no_aug_epoch`` (``epochs - stop_epoch``) from the phase schedule.

    DEIM's reference sets the lr of step t + 1 from this formula at t (its first step runs at the base lr);
    here step t uses the formula at t, so the curve is the reference's shifted by one step.
    """

    step_per_iteration = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_gamma: float = 0.5,
        flat_epoch: int = 0,
        iter_per_epoch: int = 1,
        total_epochs: int = 1,
        no_aug_epoch: int = 0,
        warmup_iter: int = 0,
        last_epoch: int = -1,
    ):
        if int(warmup_iter) < 0:
            raise ConfigError(f"lr_scheduler.warmup_iter must be >= 0, not {warmup_iter}")
        self.warmup_iters = int(warmup_iter)
        self.lr_gamma = float(lr_gamma)
        self.total_iters = int(iter_per_epoch * total_epochs)
        self.flat_iters = int(iter_per_epoch * flat_epoch)
        self.no_aug_iters = int(iter_per_epoch * no_aug_epoch)
        if self.flat_iters + self.no_aug_iters > self.total_iters:
            raise ConfigError(
                f"lr_scheduler: flat_epoch ({flat_epoch}) + no-augmentation epochs ({no_aug_epoch}) exceed "
                f"the {total_epochs} training epochs"
            )
        super().__init__(optimizer, last_epoch)

    def factor(self, t: int) -> float:
        if t <= self.warmup_iters and self.warmup_iters > 0:
            return (t / self.warmup_iters) ** 2
        if t <= self.flat_iters:
            return 1.0
        decay_end = self.total_iters - self.no_aug_iters
        if t >= decay_end:
            return self.lr_gamma
        progress = (t - self.flat_iters) / max(1, decay_end - self.flat_iters)
        return self.lr_gamma + (1.0 - self.lr_gamma) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
