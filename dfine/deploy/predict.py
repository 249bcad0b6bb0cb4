"""Detections for raw images, from a PyTorch checkpoint or an exported ONNX file, behind one interface.

Preprocessing is the validation pipeline's (dfine/deploy/images.py); boxes come back in pixels of the original
image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import dfine
from dfine.data.classes import LabelMap
from dfine.deploy.export import DeployModel, OnnxDetector
from dfine.deploy.images import load_image, preprocess  # noqa: F401 (load_image: re-exported)
from dfine.deploy.loading import class_info, load_detector, resolve_config
from dfine.ops.boxes import box_xyxy_to_xywh

logger = logging.getLogger(__name__)


class Predictor:
    """Runs a detector on batches of preprocessed images.

    Build with ``Predictor.from_file``: a ``.onnx`` file runs through onnxruntime, anything else is read as a
    checkpoint (its stored config, or ``config_path``). Both paths return the deploy postprocessor's tensors
    (labels 0..C-1), so they can be compared one to one. A checkpoint runs in deploy form (``model.deploy()``,
    as exported) unless ``deploy=False``: the same detections within 1e-6 in score and 1e-3 px in box on
    D-FINE-N (README, "Deployment"). ``channels_last`` runs the deploy form channels-last (NHWC); ``None``, the
    default, means on for the CPU, where it was measured faster (``DFINE.deploy``), and off elsewhere (not
    measured on a GPU yet).
    """

    def __init__(self, run, image_size: tuple[int, int], classes: LabelMap, device: torch.device, kind: str):
        self._run = run
        self.image_size = image_size
        self.classes = classes
        self.device = device
        self.kind = kind

    @classmethod
    def from_file(cls, path, config_path: str | None = None, overrides=(), device: str = "cpu", image_size=None,
                  deploy: bool = True, channels_last: bool | None = None) -> "Predictor":
        device = torch.device(device)
        if str(path).endswith(".onnx"):
            if channels_last:
                raise ValueError(f"{path}: channels_last applies to checkpoints (onnxruntime runs an .onnx file in its own layout)")
            detector = OnnxDetector(path, device=str(device))
            size = tuple(image_size or detector.image_size or ())
            if len(size) != 2:
                raise ValueError(f"{path} has a dynamic image size: give the input size (--size H W)")
            # files from tools/export_onnx.py carry their class names and category ids; a checkpoint or a config
            # given with -c takes precedence (and serves files exported without them)
            classes = LabelMap.from_metadata(detector.classes)
            if config_path and str(config_path).endswith((".pth", ".pt")):
                classes = class_info(*resolve_config(config_path, None, overrides))
            elif config_path:
                classes = class_info(dfine.load_config(config_path, list(overrides)), None)
            return cls(detector, size, classes, device, "onnxruntime")
        if channels_last is None:
            channels_last = deploy and device.type == "cpu"
        model, post, cfg, classes = load_detector(path, config_path, overrides, deploy=deploy, channels_last=channels_last)
        detector = DeployModel(model, post.deploy()).to(device).eval()  # tensors out, whichever form the model has
        size = tuple(image_size or cfg.get("eval_spatial_size") or (640, 640))

        @torch.no_grad()
        def run(images, sizes):
            return detector(images.to(device), sizes.to(device))

        kind = "pytorch, channels-last" if channels_last else "pytorch" if deploy else "pytorch, not deployed"
        return cls(run, (int(size[0]), int(size[1])), classes, device, kind)

    def __call__(self, images: Tensor, orig_sizes: Tensor) -> list[dict]:
        """images [B, 3, h, w], orig_sizes [B, 2] (w, h) -> per image ``labels`` [K], ``boxes`` [K, 4] xyxy pixels,
        ``scores`` [K] as numpy arrays (labels 0..C-1)."""
        labels, boxes, scores = (x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x) for x in self._run(images, orig_sizes))
        return [{"labels": labels[i], "boxes": boxes[i], "scores": scores[i]} for i in range(len(labels))]

    def predict_rgb(self, frames: list[np.ndarray]) -> list[dict]:
        """Detections for a batch of [H, W, 3] uint8 RGB images."""
        prepared = [preprocess(f, self.image_size) for f in frames]
        images = torch.stack([p[0] for p in prepared])
        sizes = torch.tensor([p[1] for p in prepared], dtype=torch.int64)
        return self(images, sizes)


def coco_records(detections: dict, image_id: int, classes: LabelMap, threshold: float = 0.0, file_name: str | None = None) -> list[dict]:
    """One image's detections above ``threshold`` as COCO result records (bbox xywh, category ids)."""
    records = []
    # float64, as Python floats: the widths are those of the float32 corners subtracted without rounding
    xywh = box_xyxy_to_xywh(torch.as_tensor(np.asarray(detections["boxes"]), dtype=torch.float64).reshape(-1, 4)).tolist()
    for label, box, score in zip(detections["labels"], xywh, detections["scores"]):
        if score < threshold:
            continue
        record = {"image_id": int(image_id), "category_id": classes.category_id(int(label)), "bbox": box, "score": float(score)}
        if file_name is not None:
            record["file_name"] = file_name
        records.append(record)
    return records


def write_json(path: Path, data) -> Path:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path
