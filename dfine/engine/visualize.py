"""Draw a model's detections on a few validation images into one PNG (the demo's picture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfine.data.classes import LabelMap
from dfine.ops.boxes import box_cxcywh_to_xyxy
from dfine.utils.drawing import draw_boxes


@torch.no_grad()
def draw_validation_detections(model, postprocessor, dataset, device, path: Path, num_images: int = 4, threshold: float = 0.4) -> Path:
    """Run ``model`` on the first ``num_images`` items of ``dataset`` (already transformed: float [3, H, W] in
    [0, 1]) and draw the detections scoring above ``threshold`` (green) and the ground truth (thin white)."""
    import cv2

    model.eval()
    classes = LabelMap.from_dataset(dataset, bool(getattr(postprocessor, "remap_mscoco_category", False)))
    tiles = []
    for index in range(min(num_images, len(dataset))):
        item = dataset[index]
        image, target = item[0], item[1]
        height, width = image.shape[-2:]
        outputs = model(image.unsqueeze(0).to(device))
        det = postprocessor(outputs, torch.tensor([[width, height]], device=device))[0]
        canvas = np.ascontiguousarray((image.permute(1, 2, 0).cpu().numpy() * 255).clip(0, 255).astype(np.uint8))
        scale = torch.tensor([width, height, width, height], dtype=target["boxes"].dtype)
        draw_boxes(canvas, (box_cxcywh_to_xyxy(target["boxes"]) * scale).tolist(), (255, 255, 255))
        keep = det["scores"] > threshold
        texts = []
        for label, score in zip(det["labels"][keep].tolist(), det["scores"][keep].tolist()):
            # a remapping postprocessor has already turned labels into COCO ids: name them through their label
            label = classes.label_of_category(label) if classes.remap_mscoco_category else label
            texts.append(f"{classes.name(label)} {score:.2f}")
        draw_boxes(canvas, det["boxes"][keep].tolist(), (0, 200, 0), texts, thickness=2)
        tiles.append(canvas)
    if not tiles:
        raise ValueError("the validation dataset is empty")
    size = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    tiles = [cv2.copyMakeBorder(t, 0, size[0] - t.shape[0], 0, size[1] - t.shape[1], cv2.BORDER_CONSTANT) for t in tiles]
    grid = np.concatenate(tiles, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return path
