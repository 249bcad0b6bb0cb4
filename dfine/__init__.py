"""dfine: a training framework for real-time DETR detectors (D-FINE, RT-DETRv2).

Public API (stable)::

    cfg = dfine.load_config("configs/dfine_n_coco.yml", overrides=["epochs=3"])
    model = dfine.build_model(cfg, load_pretrained=False)
    dfine.load_checkpoint(model, "weights.pth")
    criterion = dfine.build_criterion(cfg)
    post = dfine.build_postprocessor(cfg)
    loader = dfine.build_dataloader(cfg, "train")
    dfine.load_pretrained(model, "dfine_n_coco")    # a released model by name (downloaded once, checked)
"""

from dfine.builders import build_criterion, build_dataloader, build_model, build_postprocessor
from dfine.checkpoint import load_checkpoint
from dfine.config import ConfigError, dump_config, load_config
from dfine.weights import load_pretrained

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "build_criterion",
    "build_dataloader",
    "build_model",
    "build_postprocessor",
    "dump_config",
    "load_checkpoint",
    "load_config",
    "load_pretrained",
]
