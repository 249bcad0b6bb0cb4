"""COCO evaluation: the 12 standard numbers and a per-class AP table (faster-coco-eval, pycocotools fallback).

    coco_evaluator.py  CocoEvaluator, EvalResult, evaluate_records, load_coco_gt
    reports.py         PR curves, confusion matrix and prediction grid as PNG / TensorBoard

Imports nothing from engine/ or deploy/ (both use it).
"""

from dfine.evaluation.coco_evaluator import (
    STAT_NAMES,
    CocoEvaluator,
    EvalResult,
    detections_to_coco,
    evaluate_records,
    load_coco_gt,
)

__all__ = ["STAT_NAMES", "CocoEvaluator", "EvalResult", "detections_to_coco", "evaluate_records", "load_coco_gt"]
