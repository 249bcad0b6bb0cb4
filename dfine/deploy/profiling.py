"""Model cost figures for the benchmark tool: parameters, FLOPs (torch.utils.flop_counter, no fvcore), and eval
latency of the eager model, its torch.compile'd form and its ONNX export under onnxruntime."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def count_parameters(model: nn.Module) -> dict:
    """Parameter counts; buffers (BatchNorm statistics, cached anchors) are not parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": total, "trainable_params": trainable}


@torch.no_grad()
def count_flops(model: nn.Module, images: torch.Tensor) -> dict:
    """FLOPs of one eval forward on ``images`` (torch's counter: a multiply-add is 2 FLOPs, the unit of the D-FINE
    paper's table: N 7, S 25 GFLOPs at 640); ``gmacs`` is half of it. Ops the counter does not know
    (grid_sample, softmax, element-wise) count as free."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(images)
    flops = counter.get_total_flops()
    return {"gflops": flops / 1e9, "gmacs": flops / 2e9, "flops_batch": images.shape[0]}


def _median_time(fn, warmup: int, runs: int, synchronize) -> tuple[float, list[float]]:
    times = []
    for i in range(warmup + runs):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _sync_for(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


@torch.no_grad()
def compiled_latency(model: nn.Module, images: torch.Tensor, warmup: int, runs: int) -> dict:
    """Eval latency of ``torch.compile(model)``; the compile itself happens in the first warm-up and is timed
    apart (``compile_s``)."""
    model.eval()
    compiled = torch.compile(model)
    sync = _sync_for(images.device)
    start = time.perf_counter()
    compiled(images)
    sync()
    compile_s = time.perf_counter() - start
    median, times = _median_time(lambda: compiled(images), max(0, warmup - 1), runs, sync)
    return {"forward": median, "compile_s": compile_s, "runs_s": times}


def onnx_latency(model: nn.Module, postprocessor: nn.Module, images: torch.Tensor, warmup: int, runs: int,
                 threads: int, onnx_path: str | Path | None = None) -> dict:
    """Eval latency under onnxruntime of the deploy form (model + postprocessor, exported here at the images'
    size unless ``onnx_path`` is given). The deploy conversion changes ``model`` in place: pass a copy."""
    from dfine.deploy.export import DeployModel, OnnxDetector, export_onnx

    height, width = images.shape[-2:]
    sizes = torch.tensor([[width, height]] * images.shape[0], dtype=torch.int64)
    with tempfile.TemporaryDirectory() as tmp:
        path = onnx_path
        if path is None:
            deploy = DeployModel(model.deploy(), postprocessor.deploy())
            path = export_onnx(deploy, Path(tmp) / "bench.onnx", (height, width), batch_size=images.shape[0])
        detector = OnnxDetector(path, device=str(images.device), threads=threads)
        array, size_array = images.cpu().numpy(), sizes.numpy()
        median, times = _median_time(lambda: detector(array, size_array), warmup, runs, lambda: None)
    return {"forward": median, "runs_s": times}
