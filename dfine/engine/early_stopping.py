"""Early stopping on the EMA model's validation metric (off by default, as in the references) and the time budget.

Config::

    early_stopping: {patience: 10, min_delta: 0.0, metric: AP, even_in_main_phase: false}
    time_limit: 23.5        # hours

``patience`` counts evaluations in a row whose ``metric`` did not beat the best so far by more than ``min_delta``.
The counter starts again at the switch into the no-augmentation phase (the EMA restarts and AP jumps there), and,
unless ``even_in_main_phase`` is true, a stop is only taken inside that phase: the strong-augmentation phase is
never cut short before the no-augmentation epochs that finish a detector have run.
"""

from __future__ import annotations

import logging

from dfine.evaluation import STAT_NAMES
from dfine.registry import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

OPTIONS = ("patience", "min_delta", "metric", "even_in_main_phase")


class EarlyStopping:
    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "AP", even_in_main_phase: bool = False):
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.even_in_main_phase = even_in_main_phase
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_evaluations = 0
        self.phase: str | None = None

    @classmethod
    def from_config(cls, cfg: dict) -> "EarlyStopping | None":
        """None when ``early_stopping`` is absent or null; ConfigError (one line naming the key) when malformed."""
        section = cfg.get("early_stopping")
        if section is None or section is False:
            return None
        if not isinstance(section, dict):
            raise ConfigError(f"`early_stopping` must be a mapping {{patience, min_delta, metric, even_in_main_phase}} or null, not {section!r}")
        unknown = [k for k in section if k not in OPTIONS]
        if unknown:
            raise ConfigError(f"`early_stopping.{unknown[0]}` is not an option{did_you_mean(unknown[0], OPTIONS)} (options: {', '.join(OPTIONS)})")
        patience = section.get("patience")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"`early_stopping.patience` must be an integer >= 1 (evaluations without improvement), not {patience!r}")
        min_delta = section.get("min_delta", 0.0)
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise ConfigError(f"`early_stopping.min_delta` must be a number >= 0, not {min_delta!r}")
        metric = section.get("metric", "AP")
        if metric not in STAT_NAMES:
            raise ConfigError(f"`early_stopping.metric` must be one of {', '.join(STAT_NAMES)}, not {metric!r}{did_you_mean(str(metric), STAT_NAMES)}")
        even = section.get("even_in_main_phase", False)
        if not isinstance(even, bool):
            raise ConfigError(f"`early_stopping.even_in_main_phase` must be true or false, not {even!r}")
        return cls(patience, float(min_delta), metric, even)

    def describe(self) -> str:
        where = "in any phase" if self.even_in_main_phase else "only in the no-augmentation phase"
        return f"early stopping on {self.metric}: patience {self.patience} evaluations, min_delta {self.min_delta}, stops {where}"

    def update(self, epoch: int, phase: str, stats: dict[str, float], no_aug_phase: str) -> str | None:
        """Record the evaluation of ``epoch`` (``stats``: {stat name: value}). Returns the reason to stop now, or None."""
        if phase != self.phase:
            if self.phase is not None:
                self.bad_evaluations = 0  # a new phase: improvements are counted afresh
            self.phase = phase
        value = float(stats[self.metric])
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_evaluations = value, epoch, 0
            return None
        self.bad_evaluations += 1
        if self.bad_evaluations < self.patience or not (self.even_in_main_phase or phase == no_aug_phase):
            return None
        return (
            f"early stopping at epoch {epoch}: {self.metric} has not improved by more than {self.min_delta} for "
            f"{self.bad_evaluations} evaluations (patience {self.patience}); best {self.metric} {self.best:.4f} at epoch {self.best_epoch}"
        )

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_evaluations": self.bad_evaluations, "phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.bad_evaluations, self.phase = int(state.get("bad_evaluations", 0)), state.get("phase")


def time_limit_hours(cfg: dict) -> float | None:
    """``time_limit`` in hours, None when unset (its type and range are checked by dfine/settings.py)."""
    value = cfg.get("time_limit")
    return None if value is None else float(value)


class TimeBudget:
    """Stops after the epoch at whose end the next epoch, estimated as the longest epoch measured so far in this
    process, would end past the budget. Measured from the start of this process (a re-launched job gets a new budget)."""

    def __init__(self, hours: float, start: float):
        self.seconds, self.start = hours * 3600.0, start
        self.epoch_times: list[float] = []

    def after_epoch(self, epoch_seconds: float, now: float) -> str | None:
        self.epoch_times.append(epoch_seconds)
        elapsed = now - self.start
        if elapsed + max(self.epoch_times) <= self.seconds:
            return None
        return (
            f"time limit: {elapsed / 3600:.2f} h used of {self.seconds / 3600:.2f} h and the next epoch would take "
            f"about {max(self.epoch_times) / 60:.1f} min; stopping cleanly"
        )
