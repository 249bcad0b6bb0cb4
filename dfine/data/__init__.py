"""Registering modules are imported here explicitly."""

from dfine.data import coco, collate, mosaic, synthetic, transforms  # noqa: F401  (register DATASETS, COLLATORS, TRANSFORMS)
