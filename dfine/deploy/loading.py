"""Build a ready-to-run detector from a checkpoint: its config (stored inside our checkpoints, or given), the
model with the checkpoint's weights, the postprocessor, and the class names that go with the labels."""

from __future__ import annotations

import logging
import os

import torch.nn as nn

import dfine
from dfine.checkpoint import CheckpointError, read_checkpoint
from dfine.config import ConfigError, config_from_checkpoint
from dfine.data.classes import LabelMap

logger = logging.getLogger(__name__)

SAMPLING_METHODS = ("default", "discrete")


ClassInfo = LabelMap  # the former name of dfine.data.classes.LabelMap, kept for callers of dfine.deploy


def class_info(cfg: dict, checkpoint: dict | None) -> LabelMap:
    """What the labels of a model built from ``cfg`` and ``checkpoint`` mean (see ``LabelMap.from_checkpoint``)."""
    return LabelMap.from_checkpoint(checkpoint.get("classes") if isinstance(checkpoint, dict) else None, cfg)


def resolve_config(checkpoint_path: str | os.PathLike | None, config_path: str | None, overrides=()) -> tuple[dict, dict | None]:
    """(config, checkpoint dict or None). ``config_path`` wins; otherwise the config stored in the checkpoint
    (``dfine.config.config_from_checkpoint``, ``overrides`` reaching every use)."""
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path else None
    if config_path:
        return dfine.load_config(config_path, list(overrides)), checkpoint
    if not checkpoint_path:
        raise ConfigError("give a config (-c) or a checkpoint that stores one (-r)")
    return config_from_checkpoint(checkpoint, overrides, source=str(checkpoint_path)), checkpoint


def sampling_overrides(sampling: str | None) -> list[str]:
    """Config overrides selecting the decoder's deformable-attention sampling. ``discrete`` avoids grid_sample,
    whose FP16 TensorRT kernels are where exported models lose accuracy."""
    if sampling in (None, "default"):
        return []
    if sampling not in SAMPLING_METHODS:
        raise ConfigError(f"sampling must be one of {SAMPLING_METHODS}, not {sampling!r}")
    return [f"model.decoder.cross_attn_method={sampling}"]


def load_detector(
    checkpoint_path: str | os.PathLike | None,
    config_path: str | None = None,
    overrides=(),
    sampling: str | None = None,
    deploy: bool = False,
    channels_last: bool = False,
) -> tuple[nn.Module, nn.Module, dict, LabelMap]:
    """(model, postprocessor, config, class info), in eval mode, on the CPU.

    With ``deploy`` both are converted for export: the model fuses and prunes itself (``model.deploy()``) and
    the postprocessor returns plain tensors (labels 0..C-1, boxes, scores). ``channels_last`` (deploy only) runs
    the deployed model channels-last (``model.deploy(channels_last=True)``).
    """
    if channels_last and not deploy:
        raise ValueError("channels_last applies to the deploy form: pass deploy=True as well")
    cfg, checkpoint = resolve_config(checkpoint_path, config_path, list(overrides) + sampling_overrides(sampling))
    trained = (checkpoint or {}).get("config", {}) if isinstance(checkpoint, dict) else {}
    trained_method = trained.get("model", {}).get("decoder", {}).get("cross_attn_method", "default") if trained else None
    if sampling not in (None, "default") and trained_method not in (None, sampling):
        # measured on the demo: AP 0.153 -> 0.038 when a bilinear-trained model samples discretely
        logger.warning(
            "%s was trained with cross_attn_method=%s; sampling %s changes what the model computes and usually "
            "costs accuracy (the parity check compares against the %s model, not the trained one): fine-tune with "
            "`model.decoder.cross_attn_method: %s` first", checkpoint_path, trained_method, sampling, sampling, sampling,
        )
    model = dfine.build_model(cfg, load_pretrained=False)
    if checkpoint_path:
        try:
            dfine.load_checkpoint(model, checkpoint, source=str(checkpoint_path))  # read once, by resolve_config
        except CheckpointError as err:
            raise CheckpointError(f"{err}\n(does -c / the stored config describe the model this checkpoint was trained as?)") from None
    else:
        logger.warning("no checkpoint given: the model keeps its random initialisation")
    postprocessor = dfine.build_postprocessor(cfg)
    model.eval()
    postprocessor.eval()
    if deploy:
        model = model.deploy(channels_last=channels_last)
        postprocessor = postprocessor.deploy()
    return model, postprocessor, cfg, class_info(cfg, checkpoint)
