"""``results.csv`` and ``results.png``: the run at a glance, one row and one redraw per epoch.

results.csv is only ever appended to (flushed and fsynced per row), so a killed run keeps every finished epoch.
Columns::

    epoch, phase, time (ISO, when the row was written), epoch_time_s (train + evaluation),
    lr/pg0 ... lr/pgN (lr of each parameter group at the end of the epoch),
    train/<term> ... (mean of each loss term over the epoch), train/loss (their sum),
    AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl (the EMA model's COCO numbers),
    best (1 when this epoch's AP is the best so far, i.e. best.pth was written), note (e.g. why the run stopped)

The numbers are the very floats that go to metrics.json and TensorBoard (written with Python's round-trip repr).
"""

from __future__ import annotations

import csv
import logging
import os
from datetime import datetime
from pathlib import Path

from dfine.evaluation import STAT_NAMES
from dfine.utils.files import atomic_write

logger = logging.getLogger(__name__)

TOTAL_LOSS = "train/loss"


def results_row(epoch: int, phase: str, epoch_time_s: float, optimizer, train_stats: dict, stats, is_best: bool, note: str = "") -> dict:
    """One results.csv row. ``train_stats``: {loss term: epoch mean}; ``stats``: the 12 COCO numbers in
    STAT_NAMES order (EvalResult.stats)."""
    row = {"epoch": epoch, "phase": phase, "time": datetime.now().isoformat(timespec="seconds"), "epoch_time_s": round(epoch_time_s, 3)}
    for i, group in enumerate(optimizer.param_groups):
        row[f"lr/pg{i}"] = float(group["lr"])
    for name, value in train_stats.items():
        row[f"train/{name}"] = float(value)
    row[TOTAL_LOSS] = float(sum(train_stats.values()))
    row.update({name: float(value) for name, value in zip(STAT_NAMES, stats)})
    row["best"] = int(bool(is_best))
    row["note"] = note
    return row


class ResultsTable:
    """Append-only ``results.csv``.

    A fresh run starts a new file. A resumed run (``start_epoch`` = first epoch it trains) keeps the rows of the
    epochs before ``start_epoch`` and continues after them; rows of later epochs (written by a run killed after
    its row but before its checkpoint) are dropped once, so no epoch appears twice."""

    def __init__(self, path: str | os.PathLike, start_epoch: int = 0, resume: bool = False):
        self.path = Path(path)
        self.fieldnames: list[str] | None = None
        self._warned_columns = False
        if not self.path.is_file():
            return
        if not resume:
            self.path.unlink()
            logger.info("fresh run: previous %s removed", self.path)
            return
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            self.fieldnames = list(reader.fieldnames or []) or None
            rows = list(reader)
        kept = [r for r in rows if _epoch_of(r) is not None and _epoch_of(r) < start_epoch]
        if len(kept) != len(rows):
            # the one rewrite: atomic, and only of rows whose epoch is trained again
            self._write_all(kept)
            logger.warning("%s: %d row(s) of epochs >= %d dropped; those epochs are trained again", self.path, len(rows) - len(kept), start_epoch)
        if kept and _epoch_of(kept[-1]) != start_epoch - 1:
            logger.warning("%s ends at epoch %s but the run resumes at epoch %d", self.path, kept[-1]["epoch"], start_epoch)

    def append(self, row: dict) -> None:
        new_file = self.fieldnames is None
        if new_file:
            self.fieldnames = list(row)
        extra = [k for k in row if k not in self.fieldnames]
        if extra and not self._warned_columns:
            logger.warning("%s has no column for %s (its header was written by an earlier run); not recorded", self.path, extra)
            self._warned_columns = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fieldnames, extrasaction="ignore", restval="")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _write_all(self, rows: list[dict]) -> None:
        with atomic_write(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fieldnames or [], extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(rows)


def _epoch_of(row: dict) -> int | None:
    try:
        return int(row["epoch"])
    except (KeyError, TypeError, ValueError):
        return None


def phase_boundaries(schedule, train_loader=None) -> list[tuple[float, str]]:
    """Where the training changes character, in epochs completed: the end of the lr warm-up, the epochs at which
    augmentation-policy ops or multi-scale batches stop (when they differ from ``stop_epoch``) and the start of the
    no-augmentation phase. ``schedule``: a PhaseSchedule."""
    marks = []
    if schedule.warmup_steps > 0:
        marks.append((schedule.warmup_steps / schedule.steps_per_epoch, "warm-up ends"))
    transforms = getattr(getattr(train_loader, "dataset", None), "transforms", None)
    policy = getattr(transforms, "policy", None) or {}
    if policy.get("name") == "stop_epoch" and policy.get("epoch") != schedule.stop_epoch and policy.get("epoch", 0) < schedule.epochs:
        marks.append((float(policy["epoch"]), "policy ops off: " + ", ".join(policy.get("ops", []))))
    collate = getattr(train_loader, "collate_fn", None)
    stop_scales = getattr(collate, "stop_epoch", None)
    if getattr(collate, "scales", None) is not None and stop_scales not in (None, schedule.stop_epoch) and stop_scales < schedule.epochs:
        marks.append((float(stop_scales), "multi-scale off"))
    if schedule.stop_epoch < schedule.epochs:
        marks.append((float(schedule.stop_epoch), "no-augmentation"))
    return marks


def plot_results(rows: list[dict], path: str | os.PathLike, boundaries: list[tuple[float, str]] = (), epochs: int | None = None) -> Path:
    """Draw results.png from results.csv rows: total train loss (left), AP and AP50 (right) against epochs
    completed (epoch e's row is plotted at e + 1), with dashed lines at ``boundaries`` (x, label) and the
    no-augmentation phase shaded. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in DataLoader worker-free training processes
    import matplotlib.pyplot as plt

    path = Path(path)
    x = [int(r["epoch"]) + 1 for r in rows]
    loss = [_float(r.get(TOTAL_LOSS)) for r in rows]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax_loss.plot(x, loss, "o-", color="tab:red", label="train loss (total)")
    ax_loss.set_title("train loss (epoch mean, sum of terms)")
    for name, color in (("AP", "tab:blue"), ("AP50", "tab:green")):
        ax_ap.plot(x, [_float(r.get(name)) for r in rows], "o-", color=color, label=name)
    best = [xi for xi, r in zip(x, rows) if str(r.get("best")) == "1"]
    if best:
        ax_ap.plot(best[-1], _float(rows[x.index(best[-1])].get("AP")), "*", ms=14, color="gold", mec="k", label="best (best.pth)")
    ax_ap.set_title("validation (EMA model)")
    right = max([epochs or 0, *x, 1])
    merged: dict[float, list[str]] = {}  # boundaries at the same epoch share one line
    for where, label in boundaries:
        if where <= right:  # e.g. a warm-up longer than the run: a label off the axes would collapse the layout
            merged.setdefault(float(where), []).append(label)
    for ax in (ax_loss, ax_ap):
        for where, labels in merged.items():
            label = " / ".join(labels)
            ax.axvline(where, color="0.4", ls="--", lw=1)
            ax.annotate(label, (where, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=8, color="0.3")
        no_aug = [w for w, label in boundaries if label == "no-augmentation"]
        if no_aug:
            ax.axvspan(no_aug[0], right, color="0.9", zorder=0)
        ax.set_xlim(0, right + 0.5)
        ax.set_xlabel("epochs completed")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
