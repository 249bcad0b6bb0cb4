"""Draw a model's detections on a few validation images into one PNG (the demo's picture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def draw_validation_detections(model, postprocessor, dataset, device, path: Path, num_images: int = 4, threshold: float = 0.4) -> Path:
    """Run ``model`` on the first ``num_images`` items of ``dataset`` (already transformed: float [3, H, W] in
    [0, 1]) and draw the detections scoring above ``threshold`` (green) and the ground truth (thin white)."""
    import cv2

    model.eval()
    names = list(getattr(dataset, "class_names", []) or [])
    label_to_category = getattr(dataset, "label_to_category", {}) or {}
    category_to_label = {c: l for l, c in label_to_category.items()}
    remaps = bool(getattr(postprocessor, "remap_mscoco_category", False))
    tiles = []
    for index in range(min(num_images, len(dataset))):
        item = dataset[index]
        image, target = item[0], item[1]
        height, width = image.shape[-2:]
        outputs = model(image.unsqueeze(0).to(device))
        det = postprocessor(outputs, torch.tensor([[width, height]], device=device))[0]
        canvas = np.ascontiguousarray((image.permute(1, 2, 0).cpu().numpy() * 255).clip(0, 255).astype(np.uint8))
        for cx, cy, w, h in target["boxes"].tolist():
            x1, y1, x2, y2 = (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height
            cv2.rectangle(canvas, (int(x1), int(y1)), (int(x2), int(y2)), (255, 255, 255), 1)
        keep = det["scores"] > threshold
        for box, label, score in zip(det["boxes"][keep].tolist(), det["labels"][keep].tolist(), det["scores"][keep].tolist()):
            label = category_to_label.get(int(label), int(label)) if remaps else int(label)
            name = names[label] if 0 <= label < len(names) and names[label] else str(label)
            x1, y1, x2, y2 = (int(v) for v in box)
            cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 200, 0), 2)
            cv2.putText(canvas, f"{name} {score:.2f}", (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 0), 1)
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
