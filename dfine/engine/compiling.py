"""``compile: true``: torch.compile for the stages of the detector that only see images.

What is compiled: the ``backbone`` and ``encoder`` of the model (and of its EMA copy), in place
(``nn.Module.compile``), so state dicts, checkpoints, the EMA's deep copy and DDP see plain modules: no
``_orig_mod.`` prefix anywhere, and a checkpoint of a compiled run loads into an uncompiled model. Under DDP the
wrapper is built around the model with its compiled stages (the inner modules are compiled, not the wrapper).

Why not the whole detector: the decoder builds its denoising queries from the targets and selects queries with a
top-k, so its shapes follow the number of objects in each image. Compiled, it breaks into ~8 graphs that all
recompiled whenever an image's object count changed (measured on D-FINE-N at 128 px: 6 -> 12 graphs from the
first to the second batch), i.e. on nearly every batch of real data. The backbone and encoder see only the image tensor and its feature maps.

Input sizes: ``dynamic=False``, one static graph per input size. Multi-scale training draws from a fixed list of
sizes (11 for base 640), so the number of compiles is bounded by that list; ``dynamic=None`` (symbolic sizes after
the first change) fails in inductor's CPU backend on D-FINE-N's channels-last maps (torch 2.14: "cannot determine
truth value of Relational" in ``get_stride_order``). ``torch._dynamo.config.recompile_limit`` is raised to cover
every size of the run in both modes (training, evaluation), so no size silently falls back to eager.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
import torch.nn as nn

from dfine.errors import UsageError

logger = logging.getLogger(__name__)

COMPILED_STAGES = ("backbone", "encoder")
SPARE_COMPILES = 8  # eval graphs of the model and its EMA copy, the detections drawing at batch 1, a resumed phase


def check_compile_supported(device: torch.device) -> None:
    """UsageError (one line) when torch.compile cannot work here, before any data or model is built: dynamo
    unsupported on this Python/platform, no C++ compiler for the CPU backend, no Triton for CUDA."""
    from torch._dynamo.eval_frame import is_dynamo_supported

    if not is_dynamo_supported():
        raise UsageError(f"compile: true: torch.compile is not supported on this Python/platform (torch {torch.__version__}); "
                         "set compile: false")
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        if not any(shutil.which(c) for c in (compiler, "c++", "clang++")):
            raise UsageError(f"compile: true on the CPU needs a C++ compiler (inductor builds its kernels with it); "
                             f"none found ({compiler}, c++, clang++): install one or set compile: false")
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UsageError("compile: true on CUDA needs Triton (pip install triton) or set compile: false")


def compile_image_stages(model: nn.Module, num_sizes: int = 1) -> list[str]:
    """Compile ``model.backbone`` and ``model.encoder`` in place (static shapes); a model without them (a stand-in
    in tests) is compiled whole. ``num_sizes``: distinct input sizes the run will feed (raises the recompile
    limit to cover them). Returns the names of what was compiled."""
    stages = [name for name in COMPILED_STAGES if isinstance(getattr(model, name, None), nn.Module)]
    for module in [getattr(model, name) for name in stages] or [model]:
        module.compile(dynamic=False)
    needed = num_sizes * 2 + SPARE_COMPILES  # every size in training and (at most) in eval mode
    if torch._dynamo.config.recompile_limit < needed:
        torch._dynamo.config.recompile_limit = needed
    return stages or ["whole model"]


def compile_run_modules(model: nn.Module, ema, num_sizes: int) -> None:
    """After ``model``'s EMA copy exists (a deep copy of a compiled module would call the original's forward):
    compile the image stages of both. One log line says what."""
    stages = compile_image_stages(model, num_sizes)
    if ema is not None:
        compile_image_stages(ema.module, num_sizes)
    logger.info("torch.compile on: %s of the model%s (static shapes, one compile per input size: %d in training; "
                "the decoder runs eagerly); the first step at each size compiles (minutes on a CPU)",
                " and ".join(stages), " and of its EMA copy" if ema is not None else "", num_sizes)
