"""The training phases, resolved once from ``epochs`` / ``stop_epoch`` / the warm-up length.

* warm-up: the first ``warmup_duration`` optimizer steps, lr rising linearly (inside the main phase);
* main: epochs ``[0, stop_epoch)``, strong augmentation and multi-scale batches;
* no-augmentation: epochs ``[stop_epoch, epochs)``, augmentation off, single scale, EMA restarted with its own
  decay (entered in one named block of the train loop).
"""

from __future__ import annotations

from dataclasses import dataclass

from dfine.registry import ConfigError

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
        return cls(epochs, stop_epoch, int(warmup_steps), steps_per_epoch, accumulation, bool(multi_scale))

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

    def table(self) -> str:
        """The resolved schedule, for the log at train start."""
        warm_epochs = self.warmup_steps / self.steps_per_epoch
        main_what = "strong augmentation, " + ("multi-scale batches" if self.multi_scale else "single scale")
        rows = [
            ("phase", "epochs", "optimizer steps", "what happens"),
            ("warm-up", f"0 - {warm_epochs:.2f}", f"0 - {self.warmup_steps}", "lr rises linearly to its base value"),
            (MAIN, f"0 - {self.stop_epoch}", f"0 - {self.stop_epoch * self.steps_per_epoch}", main_what),
        ]
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
