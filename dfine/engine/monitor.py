"""What the trainer does at the end of every epoch besides checkpoints: results.csv and results.png, early
stopping and the time budget (dfine/engine/results.py, dfine/engine/early_stopping.py hold the pieces).

Checkpoint entries it adds: ``"early_stopping"`` (the counter's state, so a resumed run counts on) and
``"stopped"`` = ``{"epoch", "by": "early_stopping" | "time_limit", "reason"}`` on the checkpoint of the epoch
where the run stopped."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dfine.engine.distributed import all_ranks_true
from dfine.engine.early_stopping import EarlyStopping, TimeBudget, time_limit_hours
from dfine.settings import check_runtime_setting
from dfine.engine.loggers import check_installed, parse_loggers
from dfine.engine.phases import NO_AUG
from dfine.engine.results import ResultsTable, phase_boundaries, plot_results, results_row
from dfine.evaluation import STAT_NAMES

logger = logging.getLogger(__name__)


def validate_workflow_config(cfg: dict) -> None:
    """ConfigError (one line naming the key) for a malformed ``early_stopping``, ``time_limit`` or ``loggers``,
    or a logger whose package is missing; called before any data or model is built."""
    EarlyStopping.from_config(cfg)
    check_runtime_setting(cfg, "time_limit")
    check_installed(parse_loggers(cfg))


class TrainingMonitor:
    def __init__(self, cfg: dict, output_dir: Path, schedule, train_loader, start_epoch: int, resumed_from: dict | None, main: bool):
        """``resumed_from``: the checkpoint the run resumes from (None for a fresh run)."""
        self.output_dir, self.schedule, self.main = Path(output_dir), schedule, main
        self.boundaries = phase_boundaries(schedule, train_loader)
        self.csv = ResultsTable(self.output_dir / "results.csv", start_epoch, resume=resumed_from is not None) if main else None
        self.early_stopping = EarlyStopping.from_config(cfg)
        if self.early_stopping is not None:
            if resumed_from and resumed_from.get("early_stopping"):
                self.early_stopping.load_state_dict(resumed_from["early_stopping"])
            logger.info(self.early_stopping.describe())
            if not self.early_stopping.even_in_main_phase and schedule.no_aug_epochs == 0:
                logger.warning("early stopping never acts: this schedule has no no-augmentation phase (set early_stopping.even_in_main_phase: true)")
        hours = time_limit_hours(cfg)
        self.budget = TimeBudget(hours, time.time()) if hours else None
        if self.budget:
            logger.info("time limit: %.2f h from now", hours)
        self.epoch_start = time.time()
        self.last_result = None

    def start_epoch(self) -> None:
        self.epoch_start = time.time()

    def after_evaluation(self, epoch: int, result, device) -> tuple[str, str] | None:
        """Called on every rank after epoch ``epoch``'s evaluation. Returns (by, reason) when the run stops after
        this epoch: early stopping (same EvalResult, so the same decision on every rank) or the time budget
        (decided if any rank would overrun)."""
        self.epoch_time = time.time() - self.epoch_start
        self.last_result = result
        stop = None
        if self.early_stopping is not None:
            reason = self.early_stopping.update(epoch, self.schedule.phase(epoch), dict(zip(STAT_NAMES, result.stats)), NO_AUG)
            if reason:
                stop = ("early_stopping", reason)
        if self.budget is not None and epoch + 1 < self.schedule.epochs:
            reason = self.budget.after_epoch(self.epoch_time, time.time())
            if not all_ranks_true(reason is None, device) and stop is None:
                stop = ("time_limit", reason or "time limit reached on another rank; stopping cleanly")
        return stop

    def record(self, epoch: int, optimizer, train_stats: dict, result, is_best: bool, stop: tuple[str, str] | None) -> None:
        """Main process: append the results.csv row and redraw results.png."""
        row = results_row(epoch, self.schedule.phase(epoch), self.epoch_time, optimizer, train_stats, result.stats, is_best, stop[1] if stop else "")
        self.csv.append(row)
        try:
            plot_results(self.csv.rows(), self.output_dir / "results.png", self.boundaries, self.schedule.epochs)
        except Exception as err:  # noqa: BLE001 - a picture is never worth failing a training for
            logger.warning("could not draw %s: %s", self.output_dir / "results.png", err)

    def checkpoint_entries(self, epoch: int, stop: tuple[str, str] | None) -> dict:
        entries = {}
        if self.early_stopping is not None:
            entries["early_stopping"] = self.early_stopping.state_dict()
        if stop is not None:
            entries["stopped"] = {"epoch": epoch, "by": stop[0], "reason": stop[1]}
        return entries

    def closing_lines(self, best: dict) -> str:
        """The last lines of a run: where results.csv / results.png are, the last and the best AP."""
        lines = [f"results: {self.output_dir / 'results.csv'} (one row per epoch), curves: {self.output_dir / 'results.png'}"]
        if self.last_result is not None:
            best_text = f", best AP {best['ap']:.4f} at epoch {best['epoch']} ({self.output_dir / 'best.pth'})" if best else ""
            lines.append(f"AP {self.last_result.ap:.4f}, AP50 {self.last_result.stats[1]:.4f} at the last epoch{best_text}")
        return "\n".join(lines)


def finished_by_early_stopping(checkpoint: dict) -> str | None:
    """The reason recorded when the checkpoint's run ended by early stopping (a re-launch then has nothing to do)."""
    stopped = checkpoint.get("stopped") or {}
    return stopped.get("reason") if stopped.get("by") == "early_stopping" else None
