"""Registering modules are imported here explicitly."""

from dfine.data import coco, collate, synthetic, transforms, yolo  # noqa: F401  (register DATASETS, COLLATORS, TRANSFORMS)
