"""Deployment: ONNX export with a parity check, and inference on images, folders and videos.

    from dfine.deploy import load_detector, DeployModel, export_onnx, OnnxDetector, compare_detections, Predictor

    loading.py    a ready detector from a checkpoint (config, weights, postprocessor, LabelMap)
    export.py     DeployModel, export_onnx, OnnxDetector, compare_detections
    images.py     reading and preprocessing images (shared by export and predict)
    predict.py    Predictor (PyTorch or onnxruntime behind one interface), COCO records
    media.py      inference over an image, a folder or a video
    ap_check.py   COCO AP of the PyTorch model and of its export side by side
    profiling.py  latency measurements for the benchmark
"""

from dfine.deploy.export import DeployModel, ExportError, OnnxDetector, ParityReport, compare_detections, export_onnx
from dfine.deploy.loading import ClassInfo, load_detector, resolve_config
from dfine.deploy.predict import Predictor

__all__ = [
    "ClassInfo",
    "DeployModel",
    "ExportError",
    "OnnxDetector",
    "ParityReport",
    "Predictor",
    "compare_detections",
    "export_onnx",
    "load_detector",
    "resolve_config",
]
