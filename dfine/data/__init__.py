"""Registering modules are imported here explicitly."""

from dfine.data import coco, collate, synthetic, transforms  # noqa: F401  (register DATASETS, COLLATORS, TRANSFORMS)
