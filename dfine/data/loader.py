"""Build a DataLoader from a ``train_dataloader`` / ``val_dataloader`` config section.

Section keys (as the reference's dataloader.yml)::

    dataset: {type: CocoDetection, img_folder, ann_file, transforms: {type: Compose, ops: [...], policy: {...}}}
    shuffle: true
    num_workers: 4
    drop_last: true
    total_batch_size: 32          # across all ranks; or `batch_size` per rank
    collate_fn: {type: BatchImageCollateFunction, base_size: 640, base_size_repeat: 3, stop_epoch: 72}

Shuffling and sharding go through one DistributedSampler (one replica without torch.distributed), seeded by
the top-level ``seed``. The batch sampler tags every index with (epoch, step), so the augmentation policy and
the multi-scale size are decided from the epoch the train loop set, even in persistent worker processes.
The train loop calls ``loader.set_epoch(epoch)`` before each epoch.

Workers are forked and never call ``cv2.setNumThreads``: after a fork from a process whose OpenCV thread pool
is running, that call hangs the worker.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from dfine.registry import COLLATORS, DATASETS, TRANSFORMS, ConfigError

logger = logging.getLogger(__name__)

LOADER_KEYS = {
    "dataset": "the dataset section (with `type:`)",
    "shuffle": "shuffle every epoch",
    "num_workers": "worker processes per rank",
    "drop_last": "drop the last incomplete batch",
    "total_batch_size": "batch size summed over all ranks",
    "batch_size": "batch size per rank (instead of total_batch_size)",
    "collate_fn": "the collate section (with `type:`)",
    "pin_memory": "pin batches in page-locked memory (faster host-to-GPU copies)",
    "persistent_workers": "keep workers alive between epochs",
    "prefetch_factor": "batches each worker prepares ahead",
}


class EpochBatchSampler(Sampler):
    """Batches of ``(index, epoch, step)`` keys from ``sampler``'s indices."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, drop_last: bool):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """``start_step``: batches of this epoch already trained (a run resumed mid-epoch); they are not loaded."""
        self.epoch, self.start_step = epoch, start_step
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        batch = []
        step = 0
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                if step >= self.start_step:
                    yield [(i, self.epoch, step) for i in batch]
                batch, step = [], step + 1
        if batch and not self.drop_last and step >= self.start_step:
            yield [(i, self.epoch, step) for i in batch]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class DetectionDataLoader(DataLoader):
    """A DataLoader with one explicit ``set_epoch`` for sampler shuffling, augmentation policy and collate."""

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Shuffling, policy and scales of ``epoch``; from batch ``start_step`` on when resuming mid-epoch (the
        iterator then yields ``len(self) - start_step`` batches)."""
        self.batch_sampler.set_epoch(epoch, start_step)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if hasattr(self.collate_fn, "set_epoch"):
            self.collate_fn.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    @property
    def index_sampler(self) -> DistributedSampler:
        """The DistributedSampler behind the batches (its ``set_epoch`` is called by ``set_epoch``)."""
        return self.batch_sampler.sampler


def world_info() -> tuple[int, int]:
    """(world size, rank), (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def per_rank_batch_size(section: dict, path: str, world_size: int) -> int:
    if "total_batch_size" in section and "batch_size" in section:
        raise ConfigError(f"`{path}` sets both total_batch_size and batch_size; keep one")
    if "batch_size" in section:
        return int(section["batch_size"])
    if "total_batch_size" not in section:
        raise ConfigError(f"`{path}.total_batch_size` is missing (the batch size summed over all ranks)")
    total = int(section["total_batch_size"])
    if total % world_size:
        raise ConfigError(
            f"`{path}.total_batch_size` = {total} does not divide across {world_size} ranks; use a multiple of it"
        )
    return total // world_size


def build_dataset(section: dict, path: str):
    """Dataset from a ``dataset`` section; its ``transforms`` (a Compose section) is built first."""
    if not isinstance(section, dict) or "type" not in section:
        raise ConfigError(f"`{path}` must be a mapping with `type:` naming a dataset")
    section = dict(section)
    transforms = None
    transforms_section = section.pop("transforms", None)
    if transforms_section is not None:
        transforms_section = dict(transforms_section)
        transforms_section.setdefault("type", "Compose")
        ops = [
            TRANSFORMS.build(op, f"{path}.transforms.ops.{i}")
            for i, op in enumerate(transforms_section.pop("ops", None) or [])
        ]
        transforms = TRANSFORMS.build(transforms_section, f"{path}.transforms", ops=ops)
    return DATASETS.build(section, path, transforms=transforms)


def check_num_classes(dataset, cfg: dict, path: str) -> None:
    """Fail early when the data has more classes than the model predicts (the source of device asserts)."""
    num_classes = cfg.get("num_classes")
    needed = getattr(dataset, "num_labels", None)
    if num_classes is None or needed is None:
        return
    ann = getattr(dataset, "ann_file", None) or getattr(dataset, "data_yaml", "")
    if needed > num_classes:
        raise ConfigError(
            f"{ann} needs num_classes >= {needed} (labels 0..{needed - 1} after category mapping) but the "
            f"config has num_classes: {num_classes}; set `num_classes: {needed}` or fix `{path}.dataset` "
            "(remap_mscoco_category / category_mapping)"
        )
    if needed < num_classes:
        logger.warning("%s: the data has %d classes, the model predicts num_classes=%d (the rest stay unused)",
                       ann, needed, num_classes)


def build_dataloader_from_section(section: dict, path: str, cfg: dict) -> DetectionDataLoader:
    """Yields ``(images [B, 3, H, W] float in [0, 1], targets)``; ``targets[i]`` holds ``labels`` [N] int64,
    ``boxes`` [N, 4] float32 (cx, cy, w, h normalised), ``image_id`` [1] and ``orig_size`` [2] (w, h) int64."""
    for key in section:
        if key not in LOADER_KEYS:
            raise ConfigError(f"`{path}.{key}` is not a dataloader setting; known: {', '.join(LOADER_KEYS)}")
    if "dataset" not in section:
        raise ConfigError(f"`{path}.dataset` is missing")
    world_size, rank = world_info()
    batch_size = per_rank_batch_size(section, path, world_size)
    if cfg.get("data") and path == "val_dataloader":  # once per run: train-only runs do not exist, eval-only ones do
        from dfine.data.layouts import describe_data

        logger.info("%s", describe_data(cfg["data"]))
    dataset = build_dataset(section["dataset"], f"{path}.dataset")
    check_num_classes(dataset, cfg, path)
    collate_section = dict(section.get("collate_fn") or {"type": "BatchImageCollateFunction"})
    collate = COLLATORS.build(collate_section, f"{path}.collate_fn")
    if "seed" in cfg and hasattr(collate, "seed") and "seed" not in collate_section:
        collate.seed = int(cfg["seed"])
    if hasattr(dataset, "sample_seed"):  # per-sample augmentation seeds (dfine/data/sample_access.py)
        dataset.sample_seed = int(cfg.get("seed") or 0)
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=bool(section.get("shuffle", False)),
        seed=int(cfg.get("seed") or 0),
    )
    batch_sampler = EpochBatchSampler(sampler, batch_size, bool(section.get("drop_last", False)))
    num_workers = int(section.get("num_workers", 0))
    extra = {}
    if num_workers > 0:
        extra["persistent_workers"] = bool(section.get("persistent_workers", False))
        extra["prefetch_factor"] = int(section.get("prefetch_factor", 2))
    loader = DetectionDataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
        pin_memory=bool(section.get("pin_memory", torch.cuda.is_available())), **extra,
    )
    logger.info("%s: %d images, batch %d per rank x %d ranks, %d workers", path, len(dataset), batch_size,
                world_size, num_workers)
    return loader
