"""ONNX export of a detector with its postprocessor, an onnxruntime runner, and the parity check between them.

The exported graph has the reference's interface:

    inputs   images            float32 [B, 3, H, W] in [0, 1]
             orig_target_sizes int64   [B, 2] as (width, height)
    outputs  labels [B, K] int64 (0..C-1), boxes [B, K, 4] float32 xyxy pixels, scores [B, K] float32

Exported models have been seen to lose accuracy silently, so nothing here calls an export good before
onnxruntime has reproduced PyTorch on the same images (``compare_detections``). The class names and the
label -> category id map travel in the file's metadata (``CLASSES_METADATA_KEY``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from dfine.data.classes import LabelMap

logger = logging.getLogger(__name__)

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")
DEFAULT_OPSET = 17
CLASSES_METADATA_KEY = "dfine.classes"  # JSON {"names": [...], "label_to_category": {"0": id, ...}}


class ExportError(RuntimeError):
    """The export failed or the exported model does not reproduce PyTorch."""


class DeployModel(nn.Module):
    """Detector and postprocessor in one module with tensor-only inputs and outputs (what ONNX needs).

    Args:
        model: a detector, converted with ``model.deploy()`` for export (any eval-mode detector for inference).
        postprocessor: a postprocessor converted with ``.deploy()`` (returns labels, boxes, scores).
    """

    def __init__(self, model: nn.Module, postprocessor: nn.Module):
        super().__init__()
        self.model = model
        self.postprocessor = postprocessor

    def forward(self, images: Tensor, orig_target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, 3, H, W], orig_target_sizes [B, 2] (w, h) -> labels [B, K], boxes [B, K, 4], scores [B, K]."""
        return self.postprocessor(self.model(images), orig_target_sizes)


def export_onnx(
    deploy_model: DeployModel,
    path: str | os.PathLike,
    image_size: tuple[int, int],
    dynamic_batch: bool = False,
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
    classes: dict | None = None,
) -> Path:
    """Trace ``deploy_model`` at ``image_size`` = (H, W) and write an ONNX file checked by ``onnx.checker``.

    ``dynamic_batch`` makes the batch dimension of every input and output symbolic (``N``); otherwise the
    graph is fixed to ``batch_size``. ``simplify`` runs onnxsim when it is installed. ``classes``
    (``{"names": [...], "label_to_category": {label: id}}``) is stored in the file's metadata under
    ``CLASSES_METADATA_KEY``, so the file alone tells what its labels mean.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = image_size
    # Two images when dynamic, so the tracer cannot specialise anything on a batch of one.
    batch = max(2, batch_size) if dynamic_batch else batch_size
    images = torch.rand(batch, 3, height, width)
    sizes = torch.tensor([[width, height]] * batch, dtype=torch.int64)
    dynamic_axes = {name: {0: "N"} for name in INPUT_NAMES + OUTPUT_NAMES} if dynamic_batch else None
    deploy_model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about every Python-side shape computation; those are constants of the
        # fixed image size, which is what we want traced.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                deploy_model, (images, sizes), str(path), dynamo=False, opset_version=opset,
                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        except Exception as err:  # noqa: BLE001 - re-raised with what the user can act on
            raise ExportError(f"torch.onnx.export failed at opset {opset}: {err}") from err
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model)
    if simplify:
        try:
            import onnxsim
        except ImportError:
            raise ExportError("--simplify needs onnxsim (pip install onnxsim)") from None
        simplified, ok = onnxsim.simplify(onnx_model)
        if not ok:
            raise ExportError("onnxsim could not validate the simplified model; export without --simplify")
        onnx_model = simplified
    if classes:
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = CLASSES_METADATA_KEY, json.dumps(LabelMap.from_metadata(classes).to_metadata())
    if simplify or classes:
        onnx.save(onnx_model, str(path))
    logger.info("exported %s (opset %d, %s batch, %dx%d)", path, opset, "dynamic" if dynamic_batch else f"fixed {batch}", height, width)
    return path


class OnnxDetector:
    """An exported model run by onnxruntime, called like ``DeployModel`` but on numpy arrays.

    Args:
        path: the .onnx file.
        device: ``cpu`` or ``cuda`` (CUDAExecutionProvider when onnxruntime has it, else the CPU).
        threads: intra-op threads (0: onnxruntime's default).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise ExportError(f"{path}: inputs are {names}, expected {list(INPUT_NAMES)} (not exported by this tool?)")
        stored = self.session.get_modelmeta().custom_metadata_map.get(CLASSES_METADATA_KEY)
        self.classes: dict | None = json.loads(stored) if stored else None
        shape = self.session.get_inputs()[0].shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.image_size = (shape[2], shape[3]) if all(isinstance(s, int) for s in shape[2:]) else None

    def __call__(self, images, orig_target_sizes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images [B, 3, H, W] float32, orig_target_sizes [B, 2] int64 -> (labels, boxes, scores) arrays."""
        images = np.ascontiguousarray(_numpy(images), dtype=np.float32)
        sizes = np.ascontiguousarray(_numpy(orig_target_sizes), dtype=np.int64)
        fixed, count = self.fixed_batch, images.shape[0]
        if fixed is not None and count != fixed:
            # a fixed-batch graph: run it chunk by chunk, the last chunk padded with copies of its last image
            parts = []
            for start in range(0, count, fixed):
                chunk_images, chunk_sizes = images[start:start + fixed], sizes[start:start + fixed]
                pad = fixed - chunk_images.shape[0]
                if pad:
                    chunk_images = np.concatenate([chunk_images] + [chunk_images[-1:]] * pad)
                    chunk_sizes = np.concatenate([chunk_sizes] + [chunk_sizes[-1:]] * pad)
                parts.append([out[: fixed - pad] for out in self(chunk_images, chunk_sizes)])
            return tuple(np.concatenate(p) for p in zip(*parts))
        labels, boxes, scores = self.session.run(list(OUTPUT_NAMES), {"images": images, "orig_target_sizes": sizes})
        return labels, boxes, scores


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass
class ParityReport:
    """How far one set of deploy outputs is from another (per batch, all images).

    ``score_diff``: largest difference of the sorted score lists (order-free, so exact ties cannot inflate it).
    ``box_diff``: largest box-coordinate difference (pixels) after pairing each detection with its counterpart.
    ``unmatched``: detections with no counterpart of the same class, similar score and box, away from the
    top-k cut-off (where near-equal scores may legitimately enter one list and not the other).
    """

    score_diff: float
    box_diff: float
    unmatched: int
    num_detections: int

    @property
    def max_abs_diff(self) -> float:
        return max(self.score_diff, self.box_diff)

    def ok(self, score_tol: float, box_tol: float) -> bool:
        return self.unmatched == 0 and self.score_diff <= score_tol and self.box_diff <= box_tol

    def describe(self) -> str:
        return (
            f"max |score diff| {self.score_diff:.3g}, max |box diff| {self.box_diff:.3g} px, "
            f"{self.unmatched} of {self.num_detections} detections without a counterpart"
        )


def compare_detections(reference, other, score_tol: float = 1e-3, box_tol: float = 0.5) -> ParityReport:
    """Compare two (labels [B, K], boxes [B, K, 4], scores [B, K]) results of the same images.

    Two runs of one model may order detections of (nearly) equal score differently, so rows are paired, not
    compared by position: a detection's counterpart is the one with the same label, a score within
    ``score_tol`` and the closest box; the box difference is measured on that pair.
    """
    ref_labels, ref_boxes, ref_scores = (_numpy(t) for t in reference)
    oth_labels, oth_boxes, oth_scores = (_numpy(t) for t in other)
    if ref_scores.shape != oth_scores.shape:
        raise ExportError(f"output shapes differ: {ref_scores.shape} vs {oth_scores.shape}")
    score_diff = float(np.abs(np.sort(ref_scores, -1) - np.sort(oth_scores, -1)).max(initial=0.0))
    box_diff, unmatched = 0.0, 0
    for b in range(ref_scores.shape[0]):
        cutoff = ref_scores[b].min(initial=0.0)
        for i in range(ref_scores.shape[1]):
            same = (oth_labels[b] == ref_labels[b, i]) & (np.abs(oth_scores[b] - ref_scores[b, i]) <= score_tol)
            best = float(np.abs(oth_boxes[b][same] - ref_boxes[b, i]).max(-1).min()) if same.any() else float("inf")
            if best <= box_tol:
                box_diff = max(box_diff, best)
            elif ref_scores[b, i] > cutoff + score_tol:  # a real disagreement, not a tie at the top-k cut-off
                unmatched += 1
                if np.isfinite(best):
                    box_diff = max(box_diff, best)
    return ParityReport(score_diff=score_diff, box_diff=box_diff, unmatched=unmatched, num_detections=int(ref_scores.size))


def parity_images(image_size: tuple[int, int], count: int = 2, files=(), seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images to compare PyTorch and onnxruntime on: the given image files (resized like inference) or, when
    there are none, seeded smooth random images (smooth so that the features, unlike on white noise, vary).
    Returns images [B, 3, H, W] in [0, 1] and orig_target_sizes [B, 2] (w, h)."""
    from dfine.deploy.images import load_image, preprocess

    height, width = image_size
    if files:
        batch = [preprocess(load_image(f), image_size) for f in files]
        return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, max(2, height // 16), max(2, width // 16), generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    sizes = torch.tensor([[width, height], [int(width * 1.5), height * 2]] * count, dtype=torch.int64)[:count]
    return images.clamp(0, 1), sizes
