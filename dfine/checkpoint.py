"""Reading weights into a model: our checkpoints and the reference repositories' released .pth files."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


# Anchor buffers are computed from eval_spatial_size; a checkpoint saved at another size carries other shapes.
RECOMPUTED_BUFFERS = ("decoder.anchors", "decoder.valid_mask")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names file, keys and shapes."""


@dataclass
class LoadReport:
    """What load_checkpoint did: where the weights came from and which keys did not fit."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint shape, model shape)
    recomputed: list[str] = field(default_factory=list)  # size-dependent buffers kept as the model computed them

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for title, items in (("missing from checkpoint", self.missing), ("not in model", self.unexpected)):
            if items:
                lines.append(f"{len(items)} {title}: " + ", ".join(items[:limit]) + (" ..." if len(items) > limit else ""))
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} shape mismatches:")
            lines += [f"  {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:limit]]
        return "\n".join(lines)


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> dict:
    """torch.load with a clear error; ``weights_only=False`` only when the user trusts the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - the message is what the user needs
        hint = "" if not weights_only else " (if you trust this file, retry with weights_only=False)"
        raise CheckpointError(f"cannot read checkpoint {path}: {err}{hint}") from None


def extract_state_dict(checkpoint: dict, source: str = "checkpoint") -> tuple[dict, str]:
    """The model weights inside a checkpoint, EMA preferred: ``{'ema': {'module': sd}}``, ``{'model': sd}``,
    or a bare state dict. A ``module.`` prefix left by DDP is stripped. Returns (state dict, where it was)."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source}: expected a dict, found {type(checkpoint).__name__}")
    ema = checkpoint.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("module"), dict) and ema["module"]:
        state, where = ema["module"], "ema.module"
    elif isinstance(checkpoint.get("model"), dict):
        state, where = checkpoint["model"], "model"
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state, where = checkpoint, "state dict"
    else:
        raise CheckpointError(
            f"{source}: no weights found (looked for 'ema'->'module', 'model', or a plain state dict; "
            f"top-level keys: {sorted(checkpoint)[:10]})"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, where


def load_state_dict_checked(model: nn.Module, state: dict, source: str, strict: bool = True) -> LoadReport:
    """Copy matching tensors into ``model``. With ``strict`` any missing, unexpected or mis-shaped key raises
    CheckpointError listing them all; otherwise those keys are skipped and listed in the report."""
    report = LoadReport(source=source)
    own = model.state_dict()
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            if key.endswith(RECOMPUTED_BUFFERS):
                report.recomputed.append(key)
            else:
                report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
    report.missing = [k for k in own if k not in state]
    if strict and not report.ok:
        hints = settings_hints(report)
        advice = ""
        if hints:
            advice = (
                "\nthe checkpoint was built with other settings; rebuild the model with the config overrides\n  "
                + " ".join(hints)
                + "\n(tools: -u ...; Python: load_config(path, overrides=[...])), or fine-tune from it with -t, "
                "which skips what does not fit"
            )
        raise CheckpointError(f"checkpoint does not fit the model:\n{report.describe()}{advice}")
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    if report.recomputed:
        logger.info(
            "%s: kept the model's own %s (the checkpoint's belong to another eval_spatial_size; they are a "
            "function of it, not learned)", source, ", ".join(report.recomputed),
        )
    return report


_FFN_IN = re.compile(r"^(?P<part>encoder|decoder)\.(?:encoder\.\d+\.layers|decoder\.layers)\.\d+\.linear1\.weight$")
_SCORE_HEAD = re.compile(r"^decoder\.(?:enc_score_head|dec_score_head\.\d+)\.weight$")
_DECODER_LAYER = re.compile(r"^decoder\.decoder\.layers\.(\d+)\.")


def settings_hints(report: LoadReport) -> list[str]:
    """Config overrides that explain a mismatch, read from the shapes and names of the keys that did not fit:
    FFN widths, the learnable affine blocks (use_lab), the class count and the number of decoder layers.

    A common case: the reference code loads its YAML into a mutable default, so a script that builds several
    sizes in one process makes S..X with N's decoder FFN width 512 and use_lab on; their weights load here
    with ``model.decoder.dim_feedforward=512`` (and ``model.backbone.use_lab=true`` for L and X).
    """
    hints: dict[str, str] = {}
    for key, checkpoint_shape, _ in report.mismatched:
        if match := _FFN_IN.match(key):
            hints[f"model.{match['part']}.dim_feedforward"] = str(checkpoint_shape[0])
        elif _SCORE_HEAD.match(key) and checkpoint_shape[0] > 1:
            hints["num_classes"] = str(checkpoint_shape[0])
    if any(".lab." in k for k in report.unexpected if k.startswith("backbone.")):
        hints["model.backbone.use_lab"] = "true"
    elif any(".lab." in k for k in report.missing if k.startswith("backbone.")):
        hints["model.backbone.use_lab"] = "false"
    extra_layers = [int(m[1]) for k in report.unexpected if (m := _DECODER_LAYER.match(k))]
    absent_layers = [int(m[1]) for k in report.missing if (m := _DECODER_LAYER.match(k))]
    if extra_layers:
        hints["model.decoder.num_layers"] = str(max(extra_layers) + 1)
    elif absent_layers:
        hints["model.decoder.num_layers"] = str(min(absent_layers))
    return [f"{name}={value}" for name, value in hints.items()]


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike | dict, strict: bool = True, weights_only: bool = True,
    source: str | None = None,
) -> LoadReport:
    """Load weights from one of our checkpoints or a reference release into ``model``.

    ``path`` is a file, or a checkpoint dict already read with ``read_checkpoint`` (callers that also need its
    config, classes or epoch read the file once; ``source`` then names it in messages). Accepts
    ``{'ema': {'module': sd}}`` (preferred), ``{'model': sd}`` or a bare state dict, with or without a
    ``module.`` prefix. Mismatches raise unless ``strict=False``, in which case they are skipped, logged and
    returned in the report.
    """
    if isinstance(path, dict):
        checkpoint, source = path, source or "checkpoint"
    else:
        checkpoint, source = read_checkpoint(path, weights_only=weights_only), source or str(path)
    state, where = extract_state_dict(checkpoint, source)
    report = load_state_dict_checked(model, state, f"{source} [{where}]", strict=strict)
    if not report.ok:
        logger.warning("%s", report.describe())
    return report
