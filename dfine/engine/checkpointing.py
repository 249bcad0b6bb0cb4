"""Training checkpoints: atomic writes, the full resume state, and fine-tuning from other weights.

Layout (a superset of the reference solver's, so reference tools read ours and we read theirs)::

    {"model", "ema": {"module", "updates", "decay", "skipped"}, "optimizer", "lr_scheduler",
     "lr_warmup_scheduler", "scaler", "last_epoch", "global_step", "rng", "config", "classes", "date",
     "epoch_position", "unreadable_samples"}

``config`` keeps its ``${...}`` references (``dfine.config.stored_config``; read back with
``dfine.config.config_from_checkpoint``). ``last_epoch`` is the last finished epoch (the next run starts at
``last_epoch + 1``). A step checkpoint (``checkpoint_every_steps``) also holds ``epoch_position``
(``EpochProgress.as_dict()`` plus ``world_size``, ``batch_size`` and ``rng_per_rank``): the run resumes inside that
epoch, at its next batch (step_checkpoint.py). Everything is plain
tensors, numbers, strings, lists and dicts, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dfine.checkpoint import CheckpointError, LoadReport, extract_state_dict, load_state_dict_checked, read_checkpoint
from dfine.utils.files import atomic_write

logger = logging.getLogger(__name__)

# Objects365 class index of each COCO class (0..79), from the reference solver; used to carry the classifier
# rows of an Objects365-pretrained model onto COCO (index + 1 there, as the reference does).
OBJ365_INDEX_OF_COCO_CLASS = [
    0, 46, 5, 58, 114, 55, 116, 65, 21, 40, 176, 127, 249, 24, 56, 139, 92, 78, 99, 96,
    144, 295, 178, 180, 38, 39, 13, 43, 120, 219, 148, 173, 165, 154, 137, 113, 145, 146,
    204, 8, 35, 10, 88, 84, 93, 26, 112, 82, 265, 104, 141, 152, 234, 143, 150, 97, 2,
    50, 25, 75, 98, 153, 37, 73, 115, 132, 106, 61, 163, 134, 277, 81, 133, 18, 94, 30,
    169, 70, 328, 226,
]  # fmt: skip


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, no permission, read-only file system); the previous file
    of that name is untouched."""


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save through dfine/utils/files.py's atomic_write: a reader (or a crash) sees the old complete file or
    the new complete one, never a partial one. A failed write raises CheckpointWriteError naming the path and the
    free space (the previous file stays as it was)."""
    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:  # torch's writer reports a failed write as a RuntimeError
        raise CheckpointWriteError(_write_failure(path, err)) from None
    return path


def _write_failure(path: Path, err: BaseException) -> str:
    """One line: what failed, where, why, and how much room the file system has."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[-1]
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the folder writable or choose another output_dir"
    else:
        hint = "free some space or choose another output_dir"
    return (f"cannot write checkpoint {path}: {reason} ({free} on {path.parent}); the previous {path.name}, "
            f"if any, is unchanged; {hint}, then resume with -r")


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states, in weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def training_state(
    *,
    model: nn.Module,
    ema,
    optimizer,
    lr_scheduler,
    lr_warmup_scheduler,
    scaler,
    last_epoch: int,
    global_step: int,
    config: dict,
    classes: dict | None,
    best: dict | None = None,
    epoch_position: dict | None = None,
    unreadable_samples: int = 0,
) -> dict:
    """Everything a resumed run needs, in the checkpoint layout above."""
    return {
        "epoch_position": epoch_position,
        "unreadable_samples": int(unreadable_samples),
        "date": datetime.now().isoformat(timespec="seconds"),
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "lr_warmup_scheduler": lr_warmup_scheduler.state_dict() if lr_warmup_scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "last_epoch": int(last_epoch),
        "global_step": int(global_step),
        "rng": capture_rng_state(),
        "config": config,
        "classes": dict(classes) if classes is not None else None,
        "best": dict(best or {}),
    }


def restore_training_state(
    checkpoint: dict, *, model, ema, optimizer, lr_scheduler, lr_warmup_scheduler, scaler, source: str
) -> dict:
    """Load every part of a checkpoint written by ``training_state`` into the live objects (strict: a resume
    must fit exactly). Returns ``{"last_epoch", "global_step", "best", "epoch_position", "unreadable_samples"}``."""
    missing = [k for k in ("model", "optimizer", "last_epoch") if checkpoint.get(k) is None]
    if missing:
        raise CheckpointError(
            f"{source} cannot be resumed: it has no {', '.join(missing)} (weights-only files go to -t/--tuning)"
        )
    load_state_dict_checked(model, checkpoint["model"], f"{source} [model]", strict=True)
    if ema is not None:
        if checkpoint.get("ema"):
            ema.load_state_dict(checkpoint["ema"])
        else:
            logger.warning("%s has no EMA state; the EMA starts from the resumed weights", source)
            ema.module.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    for name, obj in (("lr_scheduler", lr_scheduler), ("lr_warmup_scheduler", lr_warmup_scheduler)):
        if obj is not None and checkpoint.get(name) is not None:
            obj.load_state_dict(checkpoint[name])
    if scaler is not None and scaler.is_enabled() and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    if checkpoint.get("rng"):
        restore_rng_state(checkpoint["rng"])
    return {
        "last_epoch": int(checkpoint["last_epoch"]),
        "global_step": int(checkpoint.get("global_step", 0)),
        "best": dict(checkpoint.get("best") or {}),
        "epoch_position": checkpoint.get("epoch_position"),
        "unreadable_samples": int(checkpoint.get("unreadable_samples") or 0),
    }


def map_class_rows(model_tensor: torch.Tensor, source_tensor: torch.Tensor) -> torch.Tensor | None:
    """Carry classifier rows between Objects365 (366 rows) and COCO (80 rows) heads as the reference does;
    None when the sizes fit neither direction."""
    if source_tensor.shape == model_tensor.shape:
        return source_tensor
    if source_tensor.shape[1:] != model_tensor.shape[1:]:
        return None
    out = model_tensor.detach().clone()
    needed = max(OBJ365_INDEX_OF_COCO_CLASS) + 2
    if source_tensor.shape[0] > model_tensor.shape[0] and model_tensor.shape[0] == len(OBJ365_INDEX_OF_COCO_CLASS):
        if source_tensor.shape[0] < needed:
            return None
        for coco, obj in enumerate(OBJ365_INDEX_OF_COCO_CLASS):
            out[coco] = source_tensor[obj + 1]
        return out
    if source_tensor.shape[0] == len(OBJ365_INDEX_OF_COCO_CLASS) and model_tensor.shape[0] >= needed:
        for coco, obj in enumerate(OBJ365_INDEX_OF_COCO_CLASS):
            out[obj + 1] = source_tensor[coco]
        return out
    return None


def is_class_head(name: str) -> bool:
    return name.startswith("decoder.enc_score_head.") or name.startswith("decoder.dec_score_head.")


def load_for_tuning(model: nn.Module, path: str | os.PathLike, class_names: list[str] | None = None,
                    class_map: str = "auto") -> LoadReport:
    """Fine-tuning start: weights (EMA preferred) from ``path`` (a file or a released model's name, see
    dfine/weights.py). With ``class_map: auto`` and the dataset's ``class_names``, the class-head rows of the
    classes whose names match the checkpoint's are kept and the rest start new (dfine/engine/class_transfer.py,
    a kept/new table is logged); ``none`` re-initialises every class row. Objects365 -> COCO (and heads without
    names) keeps the reference's mapping of the score heads (denoising embedding re-initialised). Any other mis-shaped, missing or extra
    key is skipped and listed."""
    from dfine.engine import class_transfer
    from dfine.weights import WEIGHTS, resolve_weights

    if class_map not in class_transfer.CLASS_MAP_MODES:
        raise CheckpointError(f"tuning_class_map must be one of {class_transfer.CLASS_MAP_MODES}, not {class_map!r}")
    release = WEIGHTS.get(str(path)) if not os.path.isfile(path) else None
    path = resolve_weights(path)
    checkpoint = read_checkpoint(path)
    state, where = extract_state_dict(checkpoint, str(path))
    own = model.state_dict()
    state = dict(state)
    source_names = class_transfer.source_class_names(checkpoint, state, release.classes if release else None)
    mapped = []
    if class_map == "none":
        dropped = [name for name in state if class_transfer.is_class_tensor(name)]
        state = {k: v for k, v in state.items() if k not in dropped}
        logger.info("fine-tuning: tuning_class_map none: %d class tensors start from their initialisation", len(dropped))
    elif class_names and source_names and not class_transfer.is_obj365_to_coco(source_names, class_names):
        matches = class_transfer.match_classes(source_names, list(class_names))
        state = class_transfer.transfer_class_rows(state, own, matches)
        logger.info("fine-tuning: classes of %s (tuning_class_map: auto, names matched case-insensitively)\n%s",
                    path, class_transfer.class_table(source_names, list(class_names), matches))
    else:
        for name, tensor in list(state.items()):
            if name in own and is_class_head(name) and tensor.shape != own[name].shape:
                adjusted = map_class_rows(own[name], tensor)
                if adjusted is not None:
                    state[name] = adjusted
                    mapped.append(name)
    report = load_state_dict_checked(model, state, f"{path} [{where}]", strict=False)
    if mapped:
        logger.info("fine-tuning: mapped Objects365 <-> COCO class rows of %d tensors: %s", len(mapped), ", ".join(mapped))
    logger.info("fine-tuning from %s\n%s", path, report.describe())
    return report


def resolve_resume(resume: str | None, output_dir: str | os.PathLike, cfg: dict) -> str | None:
    """The checkpoint a training resumes from. ``-r auto`` (for job schedulers that re-launch the same command):
    ``output_dir/last.pth`` when it exists, else None (a fresh start); any other value is returned unchanged.

    An ``auto`` checkpoint must be one this config's model can resume: a file of another model (other keys or
    shapes), or one without training state, raises CheckpointError naming the file."""
    if resume != "auto":
        return resume
    path = Path(output_dir) / "last.pth"
    if not path.is_file():
        logger.info("-r auto: no %s yet, starting a fresh training", path)
        return None
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict) or checkpoint.get("last_epoch") is None:
        raise CheckpointError(f"-r auto: {path} is not a training checkpoint (no model/last_epoch); move it away or pick another output_dir")
    differences = _weights_that_do_not_fit(checkpoint["model"], cfg)
    if differences:
        raise CheckpointError(
            f"-r auto: {path} holds a checkpoint of another model ({len(differences)} weights differ, e.g. {differences[0]}); "
            f"use another output_dir, or resume that run with its own config"
        )
    logger.info("-r auto: resuming from %s (epoch %s done)", path, checkpoint["last_epoch"])
    return str(path)


def _weights_that_do_not_fit(state: dict, cfg: dict) -> list[str]:
    """Keys missing, extra or mis-shaped between a checkpoint's model weights and the model ``cfg`` builds (built
    on the meta device: no memory, no initialisation cost). Size-dependent buffers the model recomputes are ignored."""
    import dfine
    from dfine.checkpoint import RECOMPUTED_BUFFERS

    try:
        with torch.device("meta"):
            own = dfine.build_model(cfg, load_pretrained=False).state_dict()
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: build it for real
        own = dfine.build_model(cfg, load_pretrained=False).state_dict()
    problems = [f"`{k}` missing" for k in own if k not in state]
    problems += [f"`{k}` unexpected" for k in state if k not in own]
    problems += [
        f"`{k}` {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape) and not k.endswith(RECOMPUTED_BUFFERS)
    ]
    return problems
