"""Checkpoints inside an epoch: ``last.pth`` every ``checkpoint_every_steps`` optimizer steps and at a requested
stop (dfine/engine/preemption.py), holding the position in the epoch, so that ``-r`` continues at the next batch
exactly as the uninterrupted run would have.

What makes the continuation exact: the sampler order, the multi-scale size and every sample's augmentation are
functions of (seed, epoch, batch or index) (dfine/data/loader.py, collate.py, sample_access.py), so the resumed
loader only needs the batch index; the model, EMA, optimizer, schedulers, scaler, the training process's random
generators and the epoch's running loss sums are saved as they are at the step boundary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from dfine.checkpoint import CheckpointError
from dfine.engine import distributed as dist_utils
from dfine.engine.checkpointing import CheckpointWriteError, atomic_save, capture_rng_state
from dfine.engine.loop import EpochProgress

logger = logging.getLogger(__name__)


def save_on_main(save: Callable[[], None]) -> None:
    """``save()`` on rank 0; a write failure there (CheckpointWriteError) is raised on every rank, so all ranks
    stop together with the same one-line message instead of waiting for rank 0 in the next collective."""
    error = None
    if dist_utils.is_main_process():
        try:
            save()
        except CheckpointWriteError as err:
            error = str(err)
    error = dist_utils.broadcast_object(error)
    if error is not None:
        raise CheckpointWriteError(error)


class StepCheckpointer:
    """The train loop's ``after_step`` hook: writes ``output_dir/last.pth`` every ``every_steps`` optimizer
    steps (0: only when a stop was requested). ``make_state(position)`` builds the checkpoint dict (rank 0)."""

    def __init__(self, every_steps: int, output_dir: Path, make_state: Callable[[dict], dict], state, batch_size: int):
        self.every_steps, self.path = int(every_steps or 0), Path(output_dir) / "last.pth"
        self.make_state, self.state, self.batch_size = make_state, state, batch_size

    def __call__(self, progress: EpochProgress, stop: bool) -> None:
        due = self.every_steps > 0 and self.state.global_step % self.every_steps == 0
        if not (due or stop):
            return
        # every rank's generators (DDP ranks draw their own denoising noise); the checkpoint's "rng" is rank 0's
        rng_per_rank = dist_utils.all_gather_objects(capture_rng_state())
        position = {**progress.as_dict(), "world_size": dist_utils.get_world_size(), "batch_size": self.batch_size,
                    "rng_per_rank": rng_per_rank}
        save_on_main(lambda: atomic_save(self.make_state(position), self.path))
        if stop or logger.isEnabledFor(logging.DEBUG):
            logger.log(logging.WARNING if stop else logging.DEBUG, "step %d (epoch %d, batch %d): %s written",
                       self.state.global_step, progress.epoch, progress.batch, self.path)


def resume_position(position: dict | None, batch_size: int, source: str) -> tuple[EpochProgress | None, dict | None]:
    """(the position to resume inside an epoch, this rank's generator states to restore once that epoch's data
    iterator exists), or (None, None) for an epoch-end checkpoint. A position fits only the same number of ranks
    and batch size: the sampler's shards and the batch boundaries depend on both."""
    if not position:
        return None, None
    world_size = dist_utils.get_world_size()
    if position.get("world_size") != world_size or position.get("batch_size") != batch_size:
        raise CheckpointError(
            f"{source} was saved inside epoch {position.get('epoch')} by {position.get('world_size')} processes with "
            f"batch {position.get('batch_size')} each; resume it with the same (now {world_size} x {batch_size})"
        )
    progress = EpochProgress(
        epoch=int(position["epoch"]), batch=int(position["batch"]), loss_sums=dict(position["loss_sums"]),
        loss_count=int(position["loss_count"]), unreadable_samples=int(position.get("unreadable_samples", 0)),
    )
    return progress, position["rng_per_rank"][dist_utils.get_rank()]
