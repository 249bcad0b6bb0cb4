"""How many training images per second one data worker produces (decode + reference training transforms).

``measure_pipeline`` times the pipeline in the calling process, i.e. one DataLoader worker's throughput;
with W workers a loader delivers at most about W times this. ``implementation="torchvision"`` times the same
ops as a plain PIL + torchvision.transforms.v2 pipeline (what the reference runs), for comparison.
"""

from __future__ import annotations

import random
import time

import torch

from dfine.data.coco import CocoDetection
from dfine.data.transforms import (
    Compose,
    ConvertBoxes,
    ConvertPILImage,
    RandomHorizontalFlip,
    RandomIoUCrop,
    RandomPhotometricDistort,
    RandomZoomOut,
    Resize,
    SanitizeBoundingBoxes,
)


def reference_training_ops(image_size: int) -> list:
    """Our implementation of the reference's training transforms (configs/base/dataloader.yml)."""
    return [
        RandomPhotometricDistort(p=0.5), RandomZoomOut(fill=0), RandomIoUCrop(p=0.8), SanitizeBoundingBoxes(1),
        RandomHorizontalFlip(), Resize([image_size, image_size]), SanitizeBoundingBoxes(1),
        ConvertPILImage("float32", True), ConvertBoxes("cxcywh", True),
    ]


class TorchvisionPipeline:
    """The same ops with PIL decoding and torchvision.transforms.v2, as the reference does them."""

    def __init__(self, dataset: CocoDetection, image_size: int):
        import torchvision.transforms.v2 as T
        from torchvision import tv_tensors

        self.dataset, self.tv_tensors, self.T = dataset, tv_tensors, T
        self.ops = T.Compose([
            T.RandomPhotometricDistort(p=0.5), T.RandomZoomOut(fill=0),
            T.RandomApply([T.RandomIoUCrop()], p=0.8), T.SanitizeBoundingBoxes(min_size=1),
            T.RandomHorizontalFlip(), T.Resize([image_size, image_size]), T.SanitizeBoundingBoxes(min_size=1),
            T.ToImage(), T.ToDtype(torch.float32, scale=True),
            T.ConvertBoundingBoxFormat("CXCYWH"),
        ])

    def __getitem__(self, index: int):
        from PIL import Image

        info = self.dataset.images[index]
        image = Image.open(self.dataset.img_folder / info["file_name"]).convert("RGB")
        target = self.dataset.load_annotations(index, image.width, image.height)
        boxes = self.tv_tensors.BoundingBoxes(torch.from_numpy(target["boxes"]), format="XYXY",
                                              canvas_size=(image.height, image.width))
        image, out = self.ops(image, {"boxes": boxes, "labels": torch.from_numpy(target["labels"])})
        height, width = image.shape[-2:]
        return image, {"boxes": out["boxes"].as_subclass(torch.Tensor) / torch.tensor([width, height] * 2),
                       "labels": out["labels"]}


def measure_pipeline(ann_file: str, img_folder: str, implementation: str = "dfine", image_size: int = 640,
                     num_images: int = 64, warmup: int = 4, seed: int = 0) -> dict:
    """Images per second of decode + training transforms in this process (one worker).

    Args:
        ann_file, img_folder: a COCO-format dataset (e.g. the synthetic one, see SyntheticDetection).
        implementation: ``"dfine"`` (ours: OpenCV + numpy) or ``"torchvision"`` (PIL + transforms.v2).
        image_size: the square Resize of the pipeline.
        num_images: images timed (cycling over the dataset), after ``warmup`` untimed ones.
        seed: seeds Python's and torch's RNG so both implementations draw comparable augmentations.
    Returns:
        {"implementation", "image_size", "images", "seconds", "images_per_s"}.
    """
    if implementation == "dfine":
        pipeline = CocoDetection(img_folder, ann_file, transforms=Compose(reference_training_ops(image_size)))
        dataset = pipeline
    elif implementation == "torchvision":
        dataset = CocoDetection(img_folder, ann_file)
        pipeline = TorchvisionPipeline(dataset, image_size)
    else:
        raise ValueError(f"implementation must be 'dfine' or 'torchvision', not {implementation!r}")
    random.seed(seed)
    torch.manual_seed(seed)
    n = len(dataset)
    for i in range(warmup):
        pipeline[i % n]
    start = time.perf_counter()
    for i in range(num_images):
        pipeline[(warmup + i) % n]
    seconds = time.perf_counter() - start
    return {"implementation": implementation, "image_size": image_size, "images": num_images,
            "seconds": round(seconds, 4), "images_per_s": round(num_images / seconds, 1)}
