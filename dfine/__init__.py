"""dfine: a training framework for real-time DETR detectors (D-FINE, RT-DETRv2).

Public API (stable)::

    cfg = dfine.load_config("configs/dfine_n_coco.yml", overrides=["epochs=3"])
    model = dfine.build_model(cfg, load_pretrained=False)
    dfine.load_checkpoint(model, "weights.pth")
    criterion = dfine.build_criterion(cfg)
    post = dfine.build_postprocessor(cfg)
    loader = dfine.build_dataloader(cfg, "train")
    dfine.load_pretrained(model, "dfine_n_coco")    # a released model by name (downloaded once, checked)

Module map (arrows point down the list: a package imports only from those below it; components.py, which
fills the registries, and errors.py, which gathers the error types, reach up by design):
    cli/         command-line programs (train, eval, infer, export_onnx, benchmark, convert, check_dataset)
    engine/      training and evaluation jobs: trainer, loop, checkpoints, EMA, optimizers, reporting
    deploy/      loading a detector for use, ONNX export and parity, inference on images and videos
    interop/     conversion to and from Hugging Face transformers
    evaluation/  COCO metrics and visual reports
    builders.py  config -> model, criterion, postprocessor, data loader (the only readers of a config)
    losses/      matcher and criterion (pure loss functions in functional.py)
    models/      detector, backbones, encoder, decoders, query selection, denoising, postprocessor
    data/        datasets, transforms, batching, label semantics (classes.py), dataset checks
    layers/      building blocks shared by the models
    ops/         box conversions and overlaps
    utils/       helpers with no dfine dependency: distributed queries, drawing, atomic file writes
    config.py, settings.py, registry.py, components.py, checkpoint.py, errors.py: configs and their typed
    settings, registries, checkpoint files, errors; weights.py: released weights by name; devices.py: device checks
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
