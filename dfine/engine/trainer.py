"""``run(cfg)``: the whole training (or evaluation) job, built explicitly in reading order:
data, model, criterion, optimizer, EMA, then the loop with its phases, evaluation and checkpoints."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import dfine
from dfine.checkpoint import read_checkpoint
from dfine.config import dump_config, stored_config
from dfine.engine import distributed as dist_utils
from dfine.engine.build import build_ema, build_optimizer, build_schedulers, warmup_steps
from dfine.engine.checkpointing import atomic_save, load_for_tuning, restore_training_state, training_state
from dfine.engine.compiling import check_compile_supported, compile_image_stages, compile_run_modules
from dfine.engine import preemption
from dfine.engine.ema import unwrap
from dfine.engine.loggers import ExperimentLoggers, tensorboard_writer
from dfine.engine.logs import setup_logging
from dfine.engine.loop import EpochProgress, StepSettings, TrainState, evaluate, train_one_epoch
from dfine.engine.monitor import TrainingMonitor, finished_by_early_stopping, validate_workflow_config
from dfine.engine.optim import describe_param_groups
from dfine.engine.phases import PhaseSchedule
from dfine.engine.preflight import run_preflight
from dfine.engine.reporting import MetricsLog, checkpoint_label_map, dataset_gt_and_labels, log_eval_result
from dfine.engine.run_settings import RunSettings
from dfine.engine.step_checkpoint import StepCheckpointer, resume_position, save_on_main
from dfine.errors import CollectiveTimeout
from dfine.evaluation import CocoEvaluator

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Every epoch starts from its own seed, so a resumed run replays exactly what an uninterrupted one does."""
    return seed + 100_003 * (epoch + 1) + 7_919 * rank


def run(cfg: dict, resume: str | None = None, test_only: bool = False, deploy: bool = False) -> int:
    """Train (or with ``test_only`` evaluate) as configured. Returns a process exit code. ``deploy`` (with
    ``test_only``): evaluate the model converted for inference (``model.deploy()``: conv + BN fused,
    re-parameterised branches merged)."""
    settings = RunSettings.from_config(cfg)
    device = dist_utils.resolve_device(settings.device)
    if settings.compile:
        check_compile_supported(device)  # one line now, not a compiler traceback at the first step
    dist_utils.init_distributed(device, timeout_minutes=float(settings.dist_timeout_minutes))
    rank = dist_utils.get_rank()
    setup_logging(settings.output_dir, rank, "eval.log" if test_only else "train.log")
    seed_everything(settings.seed + rank)
    together = False  # every rank leaves at the same point: wait for the others before leaving the group
    try:
        with preemption.StopSignalHandler():
            code = _run(cfg, settings, device, resume, test_only, deploy)
        together = True
        return code
    except preemption.Preempted as stop:
        together = True
        logger.warning("%s; last.pth holds it: resume with -r auto (exit code %d)", stop, preemption.PREEMPTED_EXIT_CODE)
        return preemption.PREEMPTED_EXIT_CODE
    finally:
        # after an error a peer may be gone: a barrier would wait for it until the collective timeout
        dist_utils.cleanup_distributed(wait_for_others=together)


@dataclass
class Evaluation:
    """What evaluating a model on the validation set needs, built once for the run."""

    model: nn.Module  # the bare model (the EMA copy is evaluated in its place during training)
    postprocessor: nn.Module
    loader: Any
    evaluator: CocoEvaluator
    label_to_category: dict | None  # contiguous label -> category id (None: the postprocessor maps them)
    classes: dict  # the class description stored in checkpoints
    device: torch.device
    use_amp: bool
    amp_dtype: torch.dtype

    def __call__(self, model: nn.Module):
        """Evaluate ``model`` (the bare one, its EMA copy or a loaded checkpoint's) -> EvalResult."""
        return evaluate(model, self.postprocessor, self.loader, self.evaluator, self.device, self.label_to_category,
                        self.use_amp, self.amp_dtype)


def _run(cfg: dict, settings: RunSettings, device: torch.device, resume: str | None, test_only: bool, deploy: bool) -> int:
    if not test_only:
        validate_workflow_config(cfg)  # early_stopping, time_limit, loggers: before anything is built
    if dist_utils.is_main_process() and not test_only:
        dump_config(cfg, settings.output_dir / "config.yml")
        logger.info("resolved config written to %s", settings.output_dir / "config.yml")
    built = _build(cfg, settings, device, resume, test_only)
    if built is None:
        return 3
    train_loader, evaluation = built
    if test_only:
        return _evaluate_only(cfg, settings, evaluation, resume, deploy)
    return _fit(cfg, settings, train_loader, evaluation, resume)


def _build(cfg: dict, settings: RunSettings, device: torch.device, resume: str | None, test_only: bool):
    """(train loader or None, Evaluation): the data, checked before any model is built, then the model (with
    ``tuning`` weights), postprocessor and evaluator. None when the data check fails."""
    train_loader = None if test_only else dfine.build_dataloader(cfg, "train")
    val_loader = dfine.build_dataloader(cfg, "val")
    if not run_preflight({"train": train_loader, "val": val_loader}, settings.num_classes):
        return None

    model = dfine.build_model(cfg, load_pretrained=not (resume or test_only))
    if settings.tuning and not resume:
        load_for_tuning(model, settings.tuning, getattr(train_loader.dataset, "class_names", None), settings.tuning_class_map)
    model.to(device)
    postprocessor = dfine.build_postprocessor(cfg).to(device)
    gt, label_to_category, classes = dataset_gt_and_labels(val_loader.dataset, postprocessor)
    use_amp, amp_dtype = settings.amp(device)
    return train_loader, Evaluation(model, postprocessor, val_loader, CocoEvaluator(gt), label_to_category, classes,
                                    device, use_amp, amp_dtype)


def _fit(cfg: dict, settings: RunSettings, train_loader, evaluation: Evaluation, resume: str | None) -> int:
    """Criterion, optimizer, schedules, EMA, the resumed state (``_resume``), then the epochs with their
    evaluation and checkpoints."""
    model, postprocessor, device, output_dir = evaluation.model, evaluation.postprocessor, evaluation.device, settings.output_dir
    classes, val_loader = evaluation.classes, evaluation.loader
    # --- criterion
    criterion = dfine.build_criterion(cfg).to(device)

    # --- optimizer and schedules (built on the bare model, before DDP wraps it)
    optimizer = build_optimizer(cfg, model)
    multi_scale = getattr(train_loader.collate_fn, "scales", None) is not None
    schedule = PhaseSchedule.from_config(cfg, len(train_loader), warmup_steps(cfg), multi_scale=multi_scale)
    lr_scheduler, lr_warmup_scheduler = build_schedulers(cfg, optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=evaluation.use_amp and evaluation.amp_dtype == torch.float16)

    # --- EMA
    ema = build_ema(cfg, model)

    # --- resume
    batch_size = train_loader.batch_sampler.batch_size
    resumed = _resume(resume, settings, batch_size, model=model, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
                      lr_warmup_scheduler=lr_warmup_scheduler, scaler=scaler)
    if resumed is None:
        return 0
    start_epoch, state, best = resumed.start_epoch, resumed.state, resumed.best
    position, resume_rng = resumed.position, resumed.rng  # where a run resumed inside an epoch continues

    train_model = dist_utils.wrap_model(
        model, device, sync_bn=bool(settings.sync_bn), find_unused_parameters=bool(settings.find_unused_parameters)
    )
    if settings.compile:  # after the EMA copy and SyncBatchNorm exist (dfine/engine/compiling.py)
        scales = getattr(train_loader.collate_fn, "scales", None)
        compile_run_modules(model, ema, num_sizes=len(set(scales)) if scales else 1)
    step_settings = StepSettings(
        device=device, use_amp=evaluation.use_amp, amp_dtype=evaluation.amp_dtype, clip_max_norm=settings.clip_max_norm,
        accumulation=schedule.accumulation, max_bad_steps=settings.max_bad_steps,
        print_freq=settings.print_freq, skip_bad_samples=bool(settings.skip_bad_samples),
    )
    logger.info("optimizer %s, parameter groups:\n%s", type(optimizer).__name__, describe_param_groups(optimizer))
    logger.info("training schedule:\n%s", schedule.table())
    writer = ExperimentLoggers(cfg, output_dir, resume=bool(resume)) if dist_utils.is_main_process() else None
    metrics = MetricsLog(output_dir / "metrics.json", resume=bool(resume))
    monitor = TrainingMonitor(cfg, output_dir, schedule, train_loader, start_epoch, resumed.checkpoint, dist_utils.is_main_process())
    del resumed  # and with it the checkpoint read for the resume
    stored = stored_config(cfg)  # with its ${...} references: an override on it reaches every use
    per_epoch_scheduler = lr_scheduler is not None and not getattr(lr_scheduler, "step_per_iteration", False)

    def state_at_step(epoch_position: dict) -> dict:  # a step checkpoint: inside the epoch after `last_epoch`
        return training_state(
            model=model, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler, lr_warmup_scheduler=lr_warmup_scheduler,
            scaler=scaler, last_epoch=epoch_position["epoch"] - 1, global_step=state.global_step, config=stored,
            classes=classes, best=best, epoch_position=epoch_position, unreadable_samples=state.unreadable_samples,
        ) | monitor.checkpoint_entries(epoch_position["epoch"] - 1, None)

    step_checkpointer = StepCheckpointer(settings.checkpoint_every_steps, output_dir, state_at_step, state, batch_size)
    for epoch in range(start_epoch, schedule.epochs):
        monitor.start_epoch()
        if position is not None and position.epoch == epoch:
            # resumed inside this epoch: its start (seeds, phase switch) is already in the restored state
            train_loader.set_epoch(epoch, start_step=position.batch)
        else:
            position, resume_rng = EpochProgress(epoch), None
            seed_everything(epoch_seed(settings.seed, epoch, dist_utils.get_rank()))
            train_loader.set_epoch(epoch)
            if schedule.is_switch_epoch(epoch):
                enter_no_augmentation_phase(
                    epoch, train_loader, ema, model, optimizer, output_dir,
                    reload_best=bool(settings.reload_best_at_stop_epoch),
                )

        try:
            train_stats = train_one_epoch(
                train_model, criterion, train_loader, optimizer, step_settings, state, epoch=epoch, scaler=scaler, ema=ema,
                lr_warmup_scheduler=lr_warmup_scheduler, lr_scheduler=lr_scheduler, writer=writer,
                progress_state=position, rng_state=resume_rng, after_step=step_checkpointer,
            )
        except RuntimeError as err:
            if dist_utils.is_distributed() and dist_utils.is_collective_failure(err):
                raise CollectiveTimeout(
                    f"rank {dist_utils.get_rank()}: a collective failed or did not complete within "
                    f"dist_timeout_minutes={settings.dist_timeout_minutes} at epoch {epoch}, after optimizer step "
                    f"{state.global_step} (another rank died or hangs): {str(err).strip().splitlines()[0]}"
                ) from None
            raise
        if per_epoch_scheduler and (lr_warmup_scheduler is None or lr_warmup_scheduler.finished()):
            lr_scheduler.step()

        eval_model = ema.module if ema is not None else model
        result = evaluation(eval_model)
        is_best = result.ap > best.get("ap", -1.0)
        if is_best:
            best = {"ap": result.ap, "epoch": epoch}
        stop = monitor.after_evaluation(epoch, result, device)  # (by, reason) when the run ends after this epoch
        if dist_utils.is_main_process():
            log_eval_result(result, epoch, writer)
            metrics.add(epoch, train_stats, result, best, schedule.phase(epoch),
                        extra={"unreadable_samples": position.unreadable_samples} if step_settings.skip_bad_samples else None)
            monitor.record(epoch, optimizer, train_stats, result, is_best, stop)
            if epoch == schedule.epochs - 1 or stop:  # visual reports of the final model, also to TensorBoard
                from dfine.evaluation.reports import write_reports_for_dataset

                write_reports_for_dataset(result, evaluation.evaluator.gt, val_loader.dataset, output_dir / "reports", writer, epoch)
            logger.info("epoch %d: AP %.4f (best %.4f at epoch %d); checkpoints in %s", epoch, result.ap, best["ap"], best["epoch"], output_dir)
        save_on_main(lambda: _save_epoch_checkpoints(
            training_state(
                model=model, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler, lr_warmup_scheduler=lr_warmup_scheduler,
                scaler=scaler, last_epoch=epoch, global_step=state.global_step, config=stored, classes=classes, best=best,
                unreadable_samples=state.unreadable_samples,
            ) | monitor.checkpoint_entries(epoch, stop), output_dir, epoch, is_best, settings.checkpoint_freq,
        ))
        dist_utils.barrier()
        if stop:
            logger.info("%s (checkpoints saved; best model: %s)", stop[1], output_dir / "best.pth")
            break

    if dist_utils.is_main_process():
        if writer is not None:
            writer.close()
        _after_training(cfg, model, ema, postprocessor, val_loader, device, output_dir)
        logger.info(monitor.closing_lines(best))
    return 0


@dataclass
class Resumed:
    """Where training starts: the beginning, or the state restored from a checkpoint."""

    start_epoch: int = 0
    state: TrainState = field(default_factory=TrainState)
    best: dict = field(default_factory=dict)
    position: EpochProgress | None = None  # set when the run resumes inside an epoch
    rng: Any = None  # the RNG states to continue that epoch with
    checkpoint: dict | None = None  # read once; the monitor takes its early-stopping state


def _resume(resume: str | None, settings: RunSettings, batch_size: int, **objects) -> Resumed | None:
    """Restore ``objects`` (model, ema, optimizer, lr_scheduler, lr_warmup_scheduler, scaler) from ``resume``.
    None when that checkpoint ends a run that stopped early: there is nothing left to train."""
    if not resume:
        return Resumed()
    checkpoint = read_checkpoint(resume)
    if settings.early_stopping and finished_by_early_stopping(checkpoint):
        logger.info("%s ends a run that stopped early (%s): nothing to do (early_stopping: null trains on)", resume, finished_by_early_stopping(checkpoint))
        return None
    restored = restore_training_state(checkpoint, **objects, source=resume)
    state = TrainState(global_step=restored["global_step"], unreadable_samples=restored["unreadable_samples"])
    position, rng = resume_position(restored["epoch_position"], batch_size, resume)
    start_epoch = position.epoch if position is not None else restored["last_epoch"] + 1
    logger.info("resumed from %s: epoch %d%s, optimizer step %d", resume, start_epoch,
                f" at batch {position.batch}" if position else "", state.global_step)
    return Resumed(start_epoch, state, restored["best"], position, rng, checkpoint)


def _save_epoch_checkpoints(ckpt: dict, output_dir: Path, epoch: int, is_best: bool, freq: int) -> None:
    # saved after evaluation, so the stored RNG/best state is exactly what the next epoch starts from
    atomic_save(ckpt, output_dir / "last.pth")
    if is_best:
        atomic_save(ckpt, output_dir / "best.pth")
    if freq and (epoch + 1) % freq == 0:
        atomic_save(ckpt, output_dir / f"checkpoint{epoch:04d}.pth")


def enter_no_augmentation_phase(
    epoch, train_loader, ema, model, optimizer, output_dir: Path, reload_best: bool = True
) -> None:
    """The switch into the last phase, in one place: restart from the best weights so far (as the D-FINE
    reference; RT-DETRv2's does not, ``reload_best=False``), augmentation policy off and single-scale batches
    (both follow ``loader.set_epoch``), EMA restarted with its own decay."""
    logger.info("=== epoch %d: entering the no-augmentation phase ===", epoch)
    best_path = output_dir / "best.pth"
    if reload_best and best_path.is_file():
        best = read_checkpoint(best_path)
        model.load_state_dict(best["model"])
        if ema is not None and best.get("ema"):
            ema.load_state_dict({**best["ema"], "decay": ema.decay})
        if best.get("optimizer"):
            optimizer.load_state_dict(best["optimizer"])
        logger.info("weights, EMA and optimizer state reloaded from %s (epoch %s)", best_path, best.get("last_epoch"))
    dataset, collate = train_loader.dataset, train_loader.collate_fn
    transforms = getattr(dataset, "transforms", None)
    if transforms is not None and hasattr(transforms, "stopped_ops"):
        logger.info("augmentation ops now off: %s", ", ".join(sorted(transforms.stopped_ops(epoch))) or "(none)")
    if hasattr(collate, "size_for") and collate.size_for(epoch, 0) is not None:
        logger.warning("the collate function still draws multi-scale sizes at epoch %d: set its stop_epoch", epoch)
    if ema is not None:
        ema.restart()


def _evaluate_only(cfg: dict, settings: RunSettings, evaluation: Evaluation, resume: str | None, deploy: bool = False) -> int:
    """Evaluate ``resume``'s weights (EMA when present) with the label map it was trained with, optionally in
    deploy form and/or compiled; metrics to the log, TensorBoard, ``eval_metrics.json`` and the visual reports."""
    output_dir = settings.output_dir
    step = 0  # TensorBoard points go at the checkpoint's epoch, beside the curves of the run that wrote it
    if resume:
        checkpoint = read_checkpoint(resume)  # read once: weights (EMA when present), class map, epoch
        dfine.load_checkpoint(evaluation.model, checkpoint, source=str(resume))
        if not getattr(evaluation.postprocessor, "remap_mscoco_category", False):
            trained_map = checkpoint_label_map(checkpoint.get("classes"), evaluation.label_to_category, resume)
            evaluation = replace(evaluation, label_to_category=trained_map)
        epoch = checkpoint.get("last_epoch")
        step = epoch if isinstance(epoch, int) and epoch >= 0 else 0
        del checkpoint
    if deploy:  # after the weights are in: the conversion folds them
        evaluation.model.deploy().to(evaluation.device)
        logger.info("deploy mode: the model's deploy() conversion applied (encoder conv + BN fused, RepVGG branches merged)")
    if settings.compile:
        stages = compile_image_stages(evaluation.model)
        logger.info("torch.compile on: %s of the evaluated model (the first batch compiles, minutes on a CPU)", " and ".join(stages))
    result = evaluation(evaluation.model)
    if dist_utils.is_main_process():
        writer = tensorboard_writer(cfg, output_dir)
        log_eval_result(result, None, writer, step=step)
        path = output_dir / "eval_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"checkpoint": resume, **result.as_dict()}, indent=1))
        logger.info("metrics written to %s", path)
        from dfine.evaluation.reports import write_reports_for_dataset  # PR curves, confusion matrix, grid (PNG)

        write_reports_for_dataset(result, evaluation.evaluator.gt, evaluation.loader.dataset, output_dir / "reports", writer, step)
        writer.close()
    return 0


def _after_training(cfg, model, ema, postprocessor, val_loader, device, output_dir: Path) -> None:
    """A picture of the final (EMA) model's detections on validation images, for a quick look."""
    from dfine.engine.visualize import draw_validation_detections

    try:
        with torch.compiler.set_stance("force_eager"):  # with compile: true, a few pictures are not worth a compile
            path = draw_validation_detections(ema.module if ema is not None else unwrap(model), postprocessor, val_loader.dataset, device, output_dir / "detections.png")
        logger.info("detections on validation images drawn in %s", path)
    except Exception as err:  # noqa: BLE001 - a picture is never worth failing a finished training for
        logger.warning("could not draw detections: %s", err)
