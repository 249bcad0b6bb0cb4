"""Multi-scale collate (sizes, rank agreement, stop epoch) and the loader built from the demo config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

import dfine
from dfine.data.collate import BatchImageCollateFunction, generate_scales
from dfine.data.loader import EpochBatchSampler, per_rank_batch_size
from dfine.registry import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_generate_scales_matches_reference_list():
    assert generate_scales(640, 3) == [480, 512, 544, 576, 608, 640, 640, 640, 800, 768, 736, 704, 672]


def items(n, size=32, epoch=0, step=0):
    return [(torch.rand(3, size, size), {"labels": torch.tensor([0])}, (epoch, step)) for _ in range(n)]


def test_collate_sizes_agree_across_ranks_and_stop():
    rank0 = BatchImageCollateFunction(base_size=128, base_size_repeat=2, stop_epoch=3, seed=7)
    rank1 = BatchImageCollateFunction(base_size=128, base_size_repeat=2, stop_epoch=3, seed=7)
    sizes = []
    for step in range(40):
        images0, _ = rank0(items(2, epoch=1, step=step))
        images1, _ = rank1(items(3, epoch=1, step=step))
        assert images0.shape[-2:] == images1.shape[-2:]
        sizes.append(images0.shape[-1])
    assert set(sizes) <= set(generate_scales(128, 2)) == {96, 128, 160}
    images, targets = rank0(items(2, epoch=3, step=0))
    assert images.shape == (2, 3, 32, 32) and len(targets) == 2  # from stop_epoch on: the transforms' size


def test_collate_without_multiscale_and_mismatched_shapes():
    collate = BatchImageCollateFunction(base_size=64, base_size_repeat=None)
    assert collate(items(2))[0].shape == (2, 3, 32, 32)
    with pytest.raises(ConfigError, match="Resize"):
        collate(items(1, size=32) + items(1, size=16))


def test_batch_sampler_gives_ranks_the_same_steps():
    dataset = list(range(21))
    keys = []
    for rank in range(2):
        sampler = EpochBatchSampler(DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0), 4,
                                    drop_last=False)
        sampler.set_epoch(5)
        keys.append([[(epoch, step) for _, epoch, step in batch] for batch in sampler])
    assert len(keys[0]) == len(keys[1]) == 3
    assert [b[0] for b in keys[0]] == [b[0] for b in keys[1]] == [(5, 0), (5, 1), (5, 2)]


def test_total_batch_size_split_across_ranks():
    assert per_rank_batch_size({"total_batch_size": 32}, "x", 4) == 8
    with pytest.raises(ConfigError, match="does not divide"):
        per_rank_batch_size({"total_batch_size": 30}, "x", 4)


def test_demo_config_train_loader_iterates_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("DFINE_CACHE", str(tmp_path))
    cfg = dfine.load_config(REPO_ROOT / "configs" / "dfine_n_demo.yml",
                            overrides=["train_dataloader.dataset.num_images=12", "train_dataloader.num_workers=0"])
    loader = dfine.build_dataloader(cfg, "train")
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) >= 1
    size = cfg["eval_spatial_size"]
    for images, targets in batches:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, *size)
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        for target in targets:
            assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
            assert target["boxes"].shape == (len(target["labels"]), 4)
            assert all(0 <= label < cfg["num_classes"] for label in target["labels"].tolist())
            assert target["orig_size"].dtype == torch.int64 and target["image_id"].dtype == torch.int64
    assert loader.dataset.class_names[0] == "red_circle"
