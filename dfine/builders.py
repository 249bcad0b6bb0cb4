"""Builders: the only code that reads a config. Each takes the resolved config dict and returns objects
built from plain arguments (see dfine/registry.py for how a section maps to a constructor)."""

from __future__ import annotations

import torch.nn as nn

from dfine.components import import_components
from dfine.registry import (
    BACKBONES,
    CRITERIONS,
    DECODERS,
    DETECTORS,
    ENCODERS,
    MATCHERS,
    POSTPROCESSORS,
    ConfigError,
)

MODEL_PARTS = ("backbone", "encoder", "decoder")


def _section(cfg: dict, name: str) -> dict:
    if name not in cfg or not isinstance(cfg[name], dict):
        raise ConfigError(f"the config has no `{name}` section (a mapping with `type:`)")
    return cfg[name]


def build_model(cfg: dict, load_pretrained: bool = True) -> nn.Module:
    """Detector from ``cfg['model']``: backbone, encoder and decoder built from their sections, then joined.

    With ``load_pretrained=False`` the backbone's ``pretrained`` flag is forced off: no file is read and
    nothing is downloaded.
    """
    import_components()
    section = _section(cfg, "model")
    for part in MODEL_PARTS:
        if part not in section:
            raise ConfigError(f"`model.{part}` is missing from the config")
    backbone_section = dict(section["backbone"])
    if not load_pretrained:
        backbone_section["pretrained"] = False
    backbone = BACKBONES.build(backbone_section, "model.backbone")
    encoder = ENCODERS.build(section["encoder"], "model.encoder")
    decoder = DECODERS.build(section["decoder"], "model.decoder")
    glue = {k: v for k, v in section.items() if k not in MODEL_PARTS}
    return DETECTORS.build(glue, "model", backbone=backbone, encoder=encoder, decoder=decoder)


def build_criterion(cfg: dict) -> nn.Module:
    """Training loss from ``cfg['criterion']``; its ``matcher`` subsection is built first."""
    import_components()
    section = _section(cfg, "criterion")
    if "matcher" not in section:
        raise ConfigError("`criterion.matcher` is missing from the config")
    matcher = MATCHERS.build(section["matcher"], "criterion.matcher")
    rest = {k: v for k, v in section.items() if k != "matcher"}
    return CRITERIONS.build(rest, "criterion", matcher=matcher)


def build_postprocessor(cfg: dict) -> nn.Module:
    """Raw outputs -> detections, from ``cfg['postprocessor']``."""
    import_components()
    return POSTPROCESSORS.build(_section(cfg, "postprocessor"), "postprocessor")


def build_dataloader(cfg: dict, split: str):
    """DataLoader for ``split`` ('train' or 'val') from ``cfg['{split}_dataloader']``."""
    import_components()
    from dfine.data.loader import build_dataloader_from_section

    name = f"{split}_dataloader"
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', not {split!r}")
    return build_dataloader_from_section(_section(cfg, name), name, cfg)
