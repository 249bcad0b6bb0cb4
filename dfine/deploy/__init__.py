"""Deployment: ONNX export with a parity check, and inference on images, folders and videos.

    from dfine.deploy import load_detector, DeployModel, export_onnx, OnnxDetector, compare_detections, Predictor
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
