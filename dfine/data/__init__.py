"""Data: datasets, transforms, batching and what labels mean. Registering modules are imported here explicitly.

    coco.py            CocoDetection (category id <-> label mapping chosen once)
    yolo.py            YoloDetection (YOLO txt labels read directly)
    layouts.py         `data: PATH`: COCO, Roboflow-COCO and YOLO layouts detected, paths and classes filled
    mosaic.py          DEIM's Mosaic transform
    synthetic.py       SyntheticDetection (the demo's and tests' data)
    transforms.py      the reference's transforms on numpy + OpenCV
    collate.py         batching with multi-scale training
    loader.py          DataLoader from a config section
    classes.py         LabelMap: class names and label -> category id, from a dataset, checkpoint or ONNX file
    coco_categories.py COCO's 80 classes and sparse ids
    checks.py          pre-flight dataset checks; throughput.py: data-worker speed
"""

from dfine.data import coco, collate, mosaic, synthetic, transforms, yolo  # noqa: F401  (register DATASETS, COLLATORS, TRANSFORMS)
