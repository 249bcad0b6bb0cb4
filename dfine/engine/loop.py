"""One training epoch and one evaluation pass. One code path for AMP on and off (autocast and GradScaler are
no-ops when disabled); losses are computed in fp32."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from dfine.data.classes import LabelMap
from dfine.data.coco import DatasetError
from dfine.data.sample_access import pop_bad_sample_notes
from dfine.engine import preemption
from dfine.engine.checkpointing import restore_rng_state
from dfine.engine.distributed import get_rank, is_main_process, reduce_mean, sum_over_ranks
from dfine.errors import NonFiniteLossError

logger = logging.getLogger(__name__)


@dataclass
class StepSettings:
    """How each optimizer step is taken (fixed for a run)."""

    device: torch.device
    use_amp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16
    clip_max_norm: float = 0.0
    accumulation: int = 1
    max_bad_steps: int = 10
    print_freq: int = 10
    skip_bad_samples: bool = False  # an unreadable image is skipped and counted instead of stopping the run


@dataclass
class TrainState:
    """Counters the loop advances; saved in checkpoints."""

    global_step: int = 0
    bad_steps: int = 0
    skipped: list = field(default_factory=list)
    unreadable_samples: int = 0  # unreadable images skipped so far, all ranks together


@dataclass
class EpochProgress:
    """Where the current epoch stands after an optimizer step: what a step checkpoint stores so that a resumed
    run continues at the next batch with the same running loss sums (and so the same metrics row)."""

    epoch: int
    batch: int = 0  # batches of this epoch done (the next one to train is this index)
    loss_sums: dict = field(default_factory=dict)
    loss_count: int = 0
    unreadable_samples: int = 0  # skipped in this epoch, all ranks together

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "loss_sums": dict(self.loss_sums),
                "loss_count": self.loss_count, "unreadable_samples": self.unreadable_samples}


def to_device(images: torch.Tensor, targets: list[dict], device: torch.device):
    images = images.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets


def to_float32(value):
    """Floating tensors of a (nested) outputs dict in fp32, so the criterion never sees bf16/fp16."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def image_ids(targets: list[dict]) -> list[int]:
    return [int(t["image_id"].reshape(-1)[0]) for t in targets if "image_id" in t]


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    settings: StepSettings,
    state: TrainState,
    *,
    epoch: int,
    scaler: torch.amp.GradScaler,
    ema=None,
    lr_warmup_scheduler=None,
    lr_scheduler=None,
    writer=None,
    progress_state: EpochProgress | None = None,
    rng_state: dict | None = None,
    after_step=None,
) -> dict[str, float]:
    """Train over ``loader`` once. Per optimizer step: forward (autocast) -> criterion (fp32) -> backward ->
    unscale + clip -> step -> EMA update -> warm-up (and per-step main schedule) step.

    Non-finite losses or gradients skip the step on every rank (the check is all-reduced), log the batch's
    image ids, and raise NonFiniteLossError after ``max_bad_steps`` consecutive bad steps.

    Fault tolerance: ``progress_state`` (an ``EpochProgress``, updated in place) starts the epoch at its
    ``batch`` with its loss sums (``loader`` then yields the remaining batches only: ``loader.set_epoch(epoch,
    start_step)``); ``rng_state`` is restored once the data iterator exists; ``after_step(progress, stop)`` runs
    at every optimizer-step boundary (the step checkpoint). One all-reduce per batch makes every rank agree on a
    non-finite loss, on unreadable images (stop, or skip with ``skip_bad_samples``) and on a stop signal
    (dfine/engine/preemption.py), after which the loop raises ``Preempted`` at the end of that step.
    Returns the mean of every loss term over the epoch.
    """
    model.train()
    criterion.train()
    device = settings.device
    per_step_schedule = lr_scheduler is not None and getattr(lr_scheduler, "step_per_iteration", False)
    position = progress_state if progress_state is not None else EpochProgress(epoch)
    sums, count, first = position.loss_sums, position.loss_count, position.batch
    num_batches = len(loader) + first  # a loader resumed mid-epoch yields only the remaining batches
    batches = iter(loader)
    if rng_state is not None:  # after the iterator exists: creating it draws from torch's generator
        restore_rng_state(rng_state)
    progress = tqdm(batches, total=num_batches, initial=first, desc=f"epoch {epoch}", disable=not is_main_process(), dynamic_ncols=True, mininterval=2.0)
    optimizer.zero_grad(set_to_none=True)
    batch_ids: list[int] = []
    stop = False
    start = time.time()
    for i, (images, targets) in enumerate(progress, start=first):
        unreadable = pop_bad_sample_notes(targets)
        images, targets = to_device(images, targets, device)
        batch_ids += image_ids(targets)
        closes_step = (i + 1) % settings.accumulation == 0 or i + 1 == num_batches
        # DDP: gradients are all-reduced only on the micro-batch that closes an optimizer step
        sync = contextlib.nullcontext() if closes_step or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=settings.amp_dtype, enabled=settings.use_amp):
                outputs = model(images, targets)
            with torch.autocast(device.type, enabled=False):
                loss_dict = criterion(to_float32(outputs), targets)
            loss = sum(loss_dict.values())
            # one all-reduce: every rank takes the same branch for a non-finite loss, unreadable images, a stop
            nonfinite, n_unreadable, stops = sum_over_ranks(
                [0.0 if torch.isfinite(loss.detach()).item() else 1.0, float(len(unreadable)), float(preemption.requested())], device
            )
            finite = nonfinite == 0
            if n_unreadable:
                _handle_unreadable(unreadable, int(n_unreadable), settings, position, state, epoch, i)
            stop = stop or stops > 0
            if finite:
                scaler.scale(loss / settings.accumulation).backward()
        if finite:
            logged = reduce_mean({k: v.detach() for k, v in loss_dict.items()})
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        if not closes_step and finite:
            continue
        stepped = finite and _optimizer_step(model, optimizer, scaler, settings)
        optimizer.zero_grad(set_to_none=True)
        if not stepped:
            state.bad_steps += 1
            state.skipped.append((epoch, i, batch_ids))
            logger.warning(
                "non-finite %s at epoch %d batch %d (step skipped, %d in a row); image ids: %s",
                "loss" if not finite else "gradient", epoch, i, state.bad_steps, batch_ids,
            )
            if state.bad_steps >= settings.max_bad_steps:
                raise NonFiniteLossError(
                    f"{state.bad_steps} consecutive non-finite steps (max_bad_steps={settings.max_bad_steps}); last image "
                    f"ids {batch_ids}. Lower the lr, check these images' annotations, or try use_amp with bfloat16."
                )
            batch_ids = []
            _end_of_step(position, i, count, after_step, stop, state)
            continue
        state.bad_steps = 0
        batch_ids = []
        if ema is not None:
            ema.update(model)
        if per_step_schedule:
            lr_scheduler.step()
        if lr_warmup_scheduler is not None:
            lr_warmup_scheduler.step()
        state.global_step += 1
        if is_main_process():
            total = sum(float(v) for v in logged.values())
            lr = optimizer.param_groups[0]["lr"]
            progress.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}", refresh=False)
            if writer is not None and state.global_step % settings.print_freq == 0:
                writer.add_scalar("Loss/total", total, state.global_step)
                for k, v in logged.items():
                    writer.add_scalar(f"Loss/{k}", float(v), state.global_step)
                for j, group in enumerate(optimizer.param_groups):
                    writer.add_scalar(f"Lr/pg_{j}", group["lr"], state.global_step)
        _end_of_step(position, i, count, after_step, stop, state)
    progress.close()
    means = {k: v / max(count, 1) for k, v in sums.items()}
    if means:
        logger.info(
            "epoch %d: loss %.4f over %d batches in %.1fs (%.2f it/s)",
            epoch, sum(means.values()), count, time.time() - start, count / max(time.time() - start, 1e-9),
        )
    return means


def _end_of_step(position: EpochProgress, i: int, count: int, after_step, stop: bool, state: TrainState) -> None:
    """The optimizer-step boundary: record the position, run the step hook (checkpoint), stop when asked."""
    position.batch, position.loss_count = i + 1, count
    if after_step is not None:
        after_step(position, stop)
    if stop:
        raise preemption.Preempted(position.epoch, state.global_step)


def _handle_unreadable(notes: list[str], total: int, settings: StepSettings, position: EpochProgress, state: TrainState, epoch: int, i: int) -> None:
    """Unreadable images in this batch on some rank (each replaced by the next readable image of its dataset):
    stop every rank, naming the file where it is known, or with ``skip_bad_samples`` log and count them."""
    if not settings.skip_bad_samples:
        if notes:
            raise DatasetError(f"{notes[0]} [epoch {epoch}, batch {i}]; set skip_bad_samples: true to skip such images")
        raise DatasetError(f"rank {get_rank()}: another rank read an unreadable image at epoch {epoch}, batch {i} (its log names it)")
    position.unreadable_samples += total
    state.unreadable_samples += total
    for note in notes:
        logger.warning("skipped (replaced by the next image): %s", note)
    if is_main_process():
        logger.warning("%d unreadable images skipped so far (%d this epoch)", state.unreadable_samples, position.unreadable_samples)


def _optimizer_step(model, optimizer, scaler, settings: StepSettings) -> bool:
    """Unscale, clip, check and step. False when the gradient is not finite (the step is not taken)."""
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if settings.clip_max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, settings.clip_max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])) if params else torch.zeros(())
    # DDP gradients are identical on every rank, so every rank takes the same decision
    if not math.isfinite(float(norm)):
        if scaler.is_enabled():
            scaler.update()  # lowers the scale; the scaler itself skips the step
        return False
    scaler.step(optimizer)
    scaler.update()
    return True


@torch.no_grad()
def evaluate(model: nn.Module, postprocessor: nn.Module, loader, evaluator, device: torch.device, label_to_category=None, use_amp=False, amp_dtype=torch.bfloat16):
    """Run ``model`` (eval mode) over ``loader``, postprocess to detections in original-image pixels, feed the
    COCO evaluator and return its EvalResult (gathered over ranks). ``label_to_category`` maps contiguous labels
    to dataset category ids when the postprocessor does not remap them itself: labels are mapped in exactly one
    of the two places, both through LabelMap (dfine/data/classes.py)."""
    labels_map = None if label_to_category is None else LabelMap(label_to_category=label_to_category)
    model.eval()
    evaluator.reset()
    progress = tqdm(loader, desc="eval", disable=not is_main_process(), dynamic_ncols=True, mininterval=2.0)
    for images, targets in progress:
        unreadable = pop_bad_sample_notes(targets)
        if unreadable:  # every image counts in an evaluation: a replaced one would bias the AP
            raise DatasetError(unreadable[0])
        images, targets = to_device(images, targets, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            outputs = model(images)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = postprocessor(to_float32(outputs), orig_sizes)
        batch = {}
        for target, det in zip(targets, detections):
            labels = det["labels"] if labels_map is None else labels_map.map_labels(det["labels"])
            batch[int(target["image_id"].reshape(-1)[0])] = {"boxes": det["boxes"], "scores": det["scores"], "labels": labels}
        evaluator.update(batch)
    progress.close()
    return evaluator.summarize()
