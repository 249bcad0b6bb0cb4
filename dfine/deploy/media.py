"""Inference over an image, a folder of images or a video: batches of frames in, annotated files and a
COCO-format results JSON out."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dfine.data.classes import LabelMap
from dfine.deploy.images import load_image
from dfine.deploy.predict import Predictor, coco_records, write_json
from dfine.utils.drawing import class_colour, draw_boxes  # noqa: F401 (class_colour: re-exported)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def draw_detections(image_rgb: np.ndarray, detections: dict, classes: LabelMap, threshold: float) -> np.ndarray:
    """A copy of ``image_rgb`` [H, W, 3] uint8 with every detection scoring at least ``threshold`` drawn as a
    box labelled ``name score``."""
    canvas = np.ascontiguousarray(image_rgb.copy())
    keep = [i for i, score in enumerate(detections["scores"]) if score >= threshold]
    labels = [int(detections["labels"][i]) for i in keep]
    return draw_boxes(
        canvas, [detections["boxes"][i] for i in keep], [class_colour(label) for label in labels],
        [f"{classes.name(label)} {float(detections['scores'][i]):.2f}" for label, i in zip(labels, keep)],
        thickness=max(1, round(min(canvas.shape[:2]) / 320)), font_scale=0.4 * max(1, round(min(canvas.shape[:2]) / 320)),
    )


def list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def infer_images(predictor: Predictor, files: list[Path], output_dir: Path, threshold: float, batch_size: int) -> list[dict]:
    """Annotated copies of ``files`` in ``output_dir`` and the COCO records of their detections (image ids are
    positions in ``files``)."""
    import cv2

    records: list[dict] = []
    progress = tqdm(total=len(files), desc="images", unit="img", disable=len(files) < 2)
    for index_batch in _batches(list(enumerate(files)), batch_size):
        frames = [load_image(path) for _, path in index_batch]
        for (image_id, path), frame, det in zip(index_batch, frames, predictor.predict_rgb(frames)):
            records += coco_records(det, image_id, predictor.classes, threshold, file_name=path.name)
            annotated = draw_detections(frame, det, predictor.classes, threshold)
            cv2.imwrite(str(output_dir / f"{path.stem}_det.jpg"), cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR))
        progress.update(len(index_batch))
    progress.close()
    return records


def infer_video(predictor: Predictor, path: Path, output_dir: Path, threshold: float, batch_size: int) -> list[dict]:
    """``<stem>_det.mp4`` with the detections drawn on every frame, and their COCO records (image id = frame
    index, from 0)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"cannot open video {path} (missing, or a codec OpenCV lacks)")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    out_path = output_dir / f"{path.stem}_det.mp4"
    writer, records, frame_index = None, [], 0
    progress = tqdm(total=total, desc="frames", unit="frame")
    try:
        while True:
            frames = []
            while len(frames) < batch_size:
                ok, frame = capture.read()
                if not ok:
                    break
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            if not frames:
                break
            for frame, det in zip(frames, predictor.predict_rgb(frames)):
                if writer is None:
                    height, width = frame.shape[:2]
                    writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
                records += coco_records(det, frame_index, predictor.classes, threshold)
                writer.write(cv2.cvtColor(draw_detections(frame, det, predictor.classes, threshold), cv2.COLOR_RGB2BGR))
                frame_index += 1
            progress.update(len(frames))
    finally:
        progress.close()
        capture.release()
        if writer is not None:
            writer.release()
    if frame_index == 0:
        raise ValueError(f"{path} has no readable frames")
    logger.info("%d frames annotated into %s", frame_index, out_path)
    return records


def run_inference(predictor: Predictor, source: str | os.PathLike, output_dir: str | os.PathLike, threshold: float = 0.4, batch_size: int = 1) -> Path:
    """Dispatch on ``source`` (image file, folder of images, or video file); returns the results JSON path
    (``<output_dir>/results.json``: a list of COCO records, each also naming its ``file_name`` for images)."""
    source, output_dir = Path(source), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if source.is_dir():
        records = infer_images(predictor, list_images(source), output_dir, threshold, batch_size)
    elif source.suffix.lower() in VIDEO_SUFFIXES:
        records = infer_video(predictor, source, output_dir, threshold, batch_size)
    elif source.suffix.lower() in IMAGE_SUFFIXES:
        records = infer_images(predictor, [source], output_dir, threshold, 1)
    elif not source.exists():
        raise ValueError(f"input not found: {source}")
    else:
        raise ValueError(f"{source}: not a folder, an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a video ({', '.join(sorted(VIDEO_SUFFIXES))})")
    path = write_json(output_dir / "results.json", records)
    logger.info("%d detections above %.2f written to %s", len(records), threshold, path)
    return path
