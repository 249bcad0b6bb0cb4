"""The training phases, resolved once from ``epochs`` / ``stop_epoch`` / the warm-up length.

* warm-up: the first ``warmup_duration`` optimizer steps, lr rising linearly (inside the main phase), or
  DEIM's quadratic warm-up over ``lr_scheduler.warmup_iter`` steps;
* main: epochs ``[0, stop_epoch)``, strong augmentation and multi-scale batches;
* no-augmentation: epochs ``[stop_epoch, epochs)``, augmentation off, single scale, EMA restarted with its own
  decay (entered in one named block of the train loop).

DEIM's policy ``train_dataloader.dataset.transforms.policy.epoch: [start, flat, stop]`` splits the main phase:
before ``start`` no strong augmentation, ``[start, flat)`` Mosaic (per sample) and Mixup (per batch, window
``collate_fn.mixup_epochs``) beside the D-FINE augmentations, ``[flat, stop)`` the D-FINE augmentations only;
``stop`` must be ``stop_epoch``, so the pair epochs/stop_epoch stays the one source of the phases.
"""

from __future__ import annotations

from dataclasses import dataclass

from dfine.registry import ConfigError

POLICY_KEY = "train_dataloader.dataset.transforms.policy.epoch"
MIXUP_KEY = "train_dataloader.collate_fn.mixup_epochs"


def _section(cfg: dict, *keys: str) -> dict:
    node = cfg
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _window(value, key: str) -> tuple[int, ...]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"`{key}` must hold integer epochs, not {value!r}")
    return tuple(values)


def augmentation_windows(cfg: dict, epochs: int, stop_epoch: int):
    """((start, flat) mosaic window or None, mosaic_prob, (start, stop) mixup window or None, mixup_prob), checked
    against ``epochs`` and ``stop_epoch``; ConfigError naming the key otherwise."""
    transforms = _section(cfg, "train_dataloader", "dataset", "transforms")
    policy = transforms.get("policy") or {}
    mosaic, mosaic_prob = None, float(transforms.get("mosaic_prob") or 0.0)
    if policy.get("name") == "stop_epoch" and isinstance(policy.get("epoch"), (list, tuple)):
        bounds = _window(policy["epoch"], POLICY_KEY)
        if len(bounds) != 3:
            raise ConfigError(f"`{POLICY_KEY}` = {list(bounds)}: give one epoch or [start, flat, stop]")
        if bounds[0] < 0 or not bounds[0] < bounds[1] < bounds[2]:
            raise ConfigError(f"`{POLICY_KEY}` = {list(bounds)}: the boundaries [start, flat, stop] must be "
                              "increasing and >= 0")
        if bounds[2] > epochs:
            raise ConfigError(f"`{POLICY_KEY}` = {list(bounds)}: the window goes beyond epochs={epochs}")
        if bounds[2] != stop_epoch:
            raise ConfigError(f"`{POLICY_KEY}` = {list(bounds)}: its stop must be stop_epoch={stop_epoch} "
                              "(write ${stop_epoch})")
        mosaic = bounds[:2]
    collate = _section(cfg, "train_dataloader", "collate_fn")
    mixup, mixup_prob = None, float(collate.get("mixup_prob") or 0.0)
    if mixup_prob > 0:
        bounds = _window(collate.get("mixup_epochs", [0, 0]), MIXUP_KEY)
        if len(bounds) != 2 or bounds[0] < 0 or bounds[0] > bounds[1]:
            raise ConfigError(f"`{MIXUP_KEY}` = {list(bounds)}: give [start, stop] with 0 <= start <= stop")
        if bounds[1] > stop_epoch:
            raise ConfigError(f"`{MIXUP_KEY}` = {list(bounds)}: the window goes beyond stop_epoch={stop_epoch} "
                              f"(epochs={epochs})")
        mixup = bounds if bounds[0] < bounds[1] else None
    return mosaic, mosaic_prob, mixup, mixup_prob

MAIN = "main"
NO_AUG = "no-augmentation"


@dataclass(frozen=True)
class PhaseSchedule:
    epochs: int
    stop_epoch: int
    warmup_steps: int
    steps_per_epoch: int
    accumulation: int = 1
    multi_scale: bool = True
    mosaic_window: tuple[int, int] | None = None  # DEIM's [start, flat)
    mosaic_prob: float = 0.0
    mixup_window: tuple[int, int] | None = None
    mixup_prob: float = 0.0
    quadratic_warmup: bool = False

    @classmethod
    def from_config(cls, cfg: dict, batches_per_epoch: int, warmup_steps: int, multi_scale: bool = True) -> "PhaseSchedule":
        epochs = cfg.get("epochs")
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"`epochs` must be a positive integer, not {epochs!r}")
        stop_epoch = cfg.get("stop_epoch")
        stop_epoch = epochs if stop_epoch is None else stop_epoch
        if not isinstance(stop_epoch, int) or not 0 <= stop_epoch <= epochs:
            raise ConfigError(f"`stop_epoch` must be an integer in [0, epochs={epochs}], not {stop_epoch!r}")
        accumulation = int(cfg.get("gradient_accumulation_steps") or 1)
        if accumulation < 1:
            raise ConfigError("`gradient_accumulation_steps` must be >= 1")
        steps_per_epoch = max(1, -(-batches_per_epoch // accumulation))  # a shorter last group still steps
        mosaic, mosaic_prob, mixup, mixup_prob = augmentation_windows(cfg, epochs, stop_epoch)
        scheduler = cfg.get("lr_scheduler") or {}
        quadratic = bool(scheduler.get("warmup_iter"))
        if quadratic and cfg.get("lr_warmup_scheduler"):
            raise ConfigError("`lr_scheduler.warmup_iter` and `lr_warmup_scheduler` both warm the lr up; set "
                              "`lr_warmup_scheduler: ~` to keep DEIM's quadratic warm-up")
        if quadratic:
            warmup_steps = int(scheduler["warmup_iter"])
        return cls(epochs, stop_epoch, int(warmup_steps), steps_per_epoch, accumulation, bool(multi_scale),
                   mosaic, mosaic_prob, mixup, mixup_prob, quadratic)

    def phase(self, epoch: int) -> str:
        return NO_AUG if epoch >= self.stop_epoch else MAIN

    def is_switch_epoch(self, epoch: int) -> bool:
        """True for the first epoch of the no-augmentation phase (when there is one)."""
        return epoch == self.stop_epoch < self.epochs

    @property
    def no_aug_epochs(self) -> int:
        return self.epochs - self.stop_epoch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def _steps(self, first_epoch: int, end_epoch: int) -> str:
        return f"{first_epoch * self.steps_per_epoch} - {end_epoch * self.steps_per_epoch}"

    def table(self) -> str:
        """The resolved schedule, for the log at train start."""
        warm_epochs = self.warmup_steps / self.steps_per_epoch
        scale = "multi-scale batches" if self.multi_scale else "single scale"
        main_what = "strong augmentation, " + scale
        rise = "quadratically" if self.quadratic_warmup else "linearly"
        rows = [
            ("phase", "epochs", "optimizer steps", "what happens"),
            ("warm-up", f"0 - {warm_epochs:.2f}", f"0 - {self.warmup_steps}", f"lr rises {rise} to its base value"),
            (MAIN, f"0 - {self.stop_epoch}", f"0 - {self.stop_epoch * self.steps_per_epoch}", main_what),
        ]
        if self.mosaic_window is not None:
            start, flat = self.mosaic_window
            rows.append(("  no strong aug", f"0 - {start}", self._steps(0, start), f"policy ops off, {scale}"))
            dense = f"mosaic p={self.mosaic_prob:g}"
            if self.mixup_window == self.mosaic_window:
                dense += f" + mixup p={self.mixup_prob:g}"
            rows.append(("  dense O2O", f"{start} - {flat}", self._steps(start, flat),
                         f"{dense} + D-FINE augmentations, {scale}"))
            rows.append(("  D-FINE aug", f"{flat} - {self.stop_epoch}", self._steps(flat, self.stop_epoch),
                         f"D-FINE augmentations only, {scale}"))
        if self.mixup_window is not None and self.mixup_window != self.mosaic_window:
            start, stop = self.mixup_window
            rows.append(("  mixup", f"{start} - {stop}", self._steps(start, stop), f"batch mixup p={self.mixup_prob:g}"))
        if self.no_aug_epochs:
            rows.append(
                (NO_AUG, f"{self.stop_epoch} - {self.epochs}", f"{self.stop_epoch * self.steps_per_epoch} - {self.total_steps}",
                 "augmentation off, single scale, EMA restarted with its own decay")
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        footer = f"{self.steps_per_epoch} optimizer steps per epoch"
        if self.accumulation > 1:
            footer += f" (gradients accumulated over {self.accumulation} batches)"
        return "\n".join(lines + [footer])
