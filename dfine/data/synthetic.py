"""A built-in synthetic detection dataset: the demo's and the tests' data, generated once, no download.

Each image has a cluttered, textured background (gradient, noise, grey lines and blobs that are no class) and
1..``max_objects`` objects of six visually distinct classes, from small to large, which may occlude each other
(a placement that would hide more than 40% of an earlier object is redrawn). Every image is drawn from its own
seeded generator, so the data is a pure function of the parameters: the same parameters give identical bytes.

The result is an ordinary COCO-format folder (``images/*.jpg`` + ``instances.json``, category ids 1..6) under
``cache_dir/<split>-<hash of the parameters>``; changing any parameter generates a new folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dfine.data.coco import CocoDetection
from dfine.registry import DATASETS, ConfigError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
# (name, RGB colour); each class differs from the others in shape and in colour or texture
SYNTHETIC_CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red_circle", (220, 40, 40)),
    ("green_square", (40, 190, 60)),
    ("blue_triangle", (40, 80, 230)),
    ("yellow_ring", (240, 210, 30)),
    ("magenta_cross", (210, 40, 200)),
    ("checker_diamond", (0, 0, 0)),  # black and white checkerboard texture
)
MAX_HIDDEN_FRACTION = 0.4


def default_cache_dir() -> Path:
    """``$DFINE_CACHE/synthetic`` if DFINE_CACHE is set, else ``.cache/synthetic`` in the repository checkout, else
    ``~/.cache/dfine/synthetic``."""
    if os.environ.get("DFINE_CACHE"):
        return Path(os.environ["DFINE_CACHE"]) / "synthetic"
    repo = Path(__file__).resolve().parents[2]
    if (repo / "configs").is_dir() and os.access(repo, os.W_OK):
        return repo / ".cache" / "synthetic"
    return Path.home() / ".cache" / "dfine" / "synthetic"


def _polygon(centre, radius: float, sides: int, angle: float) -> np.ndarray:
    turns = angle + 2 * np.pi * np.arange(sides) / sides
    points = np.stack([centre[0] + radius * np.cos(turns), centre[1] + radius * np.sin(turns)], axis=1)
    return np.round(points).astype(np.int32)


def _object_mask(kind: int, size: int, centre, angle: float, image_size: int) -> np.ndarray:
    """[S, S] uint8 mask of one object of class ``kind`` whose extent is about ``size`` pixels."""
    mask = np.zeros((image_size, image_size), np.uint8)
    c = (int(round(centre[0])), int(round(centre[1])))
    r = size / 2
    if kind == 0:
        cv2.circle(mask, c, int(round(r)), 1, -1)
    elif kind == 1:
        cv2.fillPoly(mask, [_polygon(centre, r * 1.2, 4, angle + np.pi / 4)], 1)
    elif kind == 2:
        cv2.fillPoly(mask, [_polygon(centre, r * 1.1, 3, angle - np.pi / 2)], 1)
    elif kind == 3:
        cv2.circle(mask, c, int(round(r * 0.8)), 1, max(2, int(round(r * 0.4))))
    elif kind == 4:
        arm = np.array([[-r, -r / 3], [r, -r / 3], [r, r / 3], [-r, r / 3]])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        for turn in (rot, rot @ np.array([[0, -1], [1, 0]])):
            cv2.fillPoly(mask, [np.round(arm @ turn.T + centre).astype(np.int32)], 1)
    else:
        cv2.fillPoly(mask, [_polygon(centre, r * 1.1, 4, angle)], 1)
    return mask


def _object_paint(kind: int, size: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """[S, S, 3] float32 colours for class ``kind`` (uniform colour with jitter and shading, or a checkerboard)."""
    if kind == 5:
        cell = max(2, size // 4)
        yy, xx = np.mgrid[0:image_size, 0:image_size]
        checker = ((yy // cell + xx // cell) % 2).astype(np.float32) * 235 + 10
        return np.repeat(checker[..., None], 3, axis=2)
    colour = np.array(SYNTHETIC_CLASSES[kind][1], np.float32) + rng.uniform(-20, 20, 3)
    shade = rng.normal(0, 6, (image_size, image_size, 1)).astype(np.float32)
    return np.clip(colour + shade, 0, 255)


def _background(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """[S, S, 3] float32: a low-saturation gradient with noise and grey clutter (no object class)."""
    base = rng.uniform(70, 190)
    tint = rng.uniform(-15, 15, 3)
    ramp = np.linspace(-1, 1, image_size, dtype=np.float32)
    direction = rng.uniform(-40, 40, 2)
    image = base + tint + direction[0] * ramp[None, :, None] + direction[1] * ramp[:, None, None]
    image = np.broadcast_to(image, (image_size, image_size, 3)).copy()
    for _ in range(int(rng.integers(3, 10))):
        grey = float(rng.uniform(30, 230))
        p1, p2 = rng.integers(0, image_size, 2), rng.integers(0, image_size, 2)
        cv2.line(image, tuple(int(v) for v in p1), tuple(int(v) for v in p2), (grey, grey, grey),
                 int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(2, 8))):
        grey = float(rng.uniform(30, 230))
        centre = tuple(int(v) for v in rng.integers(0, image_size, 2))
        axes = tuple(int(v) for v in rng.integers(2, max(3, image_size // 16), 2))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, (grey, grey, grey), -1)
    image += rng.normal(0, 8, image.shape).astype(np.float32)
    return image


def render_image(image_size: int, max_objects: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """([S, S, 3] uint8 RGB image, [{category_id, bbox (x, y, w, h), area}]) for one synthetic image."""
    image = _background(image_size, rng)
    min_size, max_size = max(12, image_size // 20), image_size // 2
    placed: list[tuple[int, np.ndarray, int]] = []  # (class, visible mask, full area)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            kind = int(rng.integers(len(SYNTHETIC_CLASSES)))
            size = int(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
            centre = rng.uniform(size / 2 + 1, image_size - size / 2 - 1, 2)
            mask = _object_mask(kind, size, centre, float(rng.uniform(0, 2 * np.pi)), image_size)
            if mask.sum() < 16:
                continue
            still_visible = [(m & ~mask.astype(bool)) for _, m, _ in placed]
            if all(v.sum() >= (1 - MAX_HIDDEN_FRACTION) * a for v, (_, _, a) in zip(still_visible, placed)):
                break
        else:
            continue
        paint = _object_paint(kind, size, image_size, rng)
        inside = mask.astype(bool)
        image[inside] = paint[inside]
        placed = [(k, v, a) for (k, _, a), v in zip(placed, still_visible)]
        placed.append((kind, inside, int(inside.sum())))
    annotations = []
    for kind, visible, _ in placed:
        ys, xs = np.nonzero(visible)
        x1, y1 = int(xs.min()), int(ys.min())
        annotations.append({
            "category_id": kind + 1,
            "bbox": [x1, y1, int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1],
            "area": int(visible.sum()),
        })
    return np.clip(np.round(image), 0, 255).astype(np.uint8), annotations


def generate_synthetic_coco(out_dir: Path, split: str, num_images: int, image_size: int, seed: int,
                            max_objects: int) -> None:
    """Write ``out_dir/images/{split}_{i:06d}.jpg`` and ``out_dir/instances.json``."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    split_code = zlib.crc32(split.encode())
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_code, index])
        pixels, objects = render_image(image_size, max_objects, rng)
        name = f"{split}_{index:06d}.jpg"
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode synthetic image {name}")
        (out_dir / "images" / name).write_bytes(encoded.tobytes())
        images.append({"id": index + 1, "file_name": name, "width": image_size, "height": image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 0, **obj})
    coco = {
        "info": {"description": f"dfine synthetic {split} (seed {seed}, generator v{GENERATOR_VERSION})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, (name, _) in enumerate(SYNTHETIC_CLASSES)],
    }
    (out_dir / "instances.json").write_text(json.dumps(coco), encoding="utf-8")


def ensure_synthetic_dataset(split: str = "train", num_images: int = 512, image_size: int = 320, seed: int = 0,
                             max_objects: int = 6, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding this split for these parameters, generated on first use. Safe when several processes
    (DDP ranks) ask at once: each writes a private folder and the first rename wins."""
    if num_images < 1 or image_size < 64 or max_objects < 1:
        raise ConfigError("SyntheticDetection needs num_images >= 1, image_size >= 64 and max_objects >= 1")
    params: dict[str, Any] = {"split": split, "num_images": num_images, "image_size": image_size, "seed": seed,
                              "max_objects": max_objects, "version": GENERATOR_VERSION}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"{split}-{digest}"
    if (final / "instances.json").is_file():
        return final
    logger.info("generating synthetic %s split (%d images of %d px) in %s", split, num_images, image_size, final)
    tmp = root / f".tmp-{split}-{digest}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate_synthetic_coco(tmp, split, num_images, image_size, seed, max_objects)
    (tmp / "params.json").write_text(json.dumps(params, sort_keys=True), encoding="utf-8")
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@DATASETS.register
class SyntheticDetection(CocoDetection):
    """CocoDetection over the synthetic data for (``split``, ``num_images``, ``image_size``, ``seed``,
    ``max_objects``), generated into ``cache_dir`` (default: see ``default_cache_dir``) when missing.
    Six classes, category ids 1..6, mapped to labels 0..5. ``img_folder``/``ann_file`` exist only so a config
    can clear the paths it inherits from a COCO base (they must be null); ``return_masks`` must be false."""

    def __init__(self, split: str = "train", num_images: int = 512, image_size: int = 320, seed: int = 0,
                 max_objects: int = 6, cache_dir: str | None = None, transforms: Any = None,
                 remap_mscoco_category: bool = False, category_mapping: str = "auto",
                 img_folder: None = None, ann_file: None = None, return_masks: bool = False):
        if img_folder is not None or ann_file is not None:
            raise ConfigError("SyntheticDetection generates its own images and json: set `img_folder: ~` and "
                              "`ann_file: ~` (or use CocoDetection with your files)")
        if return_masks:
            raise ConfigError("SyntheticDetection: return_masks: true is not supported; set it to false")
        folder = ensure_synthetic_dataset(split, num_images, image_size, seed, max_objects, cache_dir)
        super().__init__(img_folder=str(folder / "images"), ann_file=str(folder / "instances.json"),
                         transforms=transforms, remap_mscoco_category=remap_mscoco_category,
                         category_mapping=category_mapping)
