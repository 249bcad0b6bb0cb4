"""Helpers several test modules share (no ``test_`` prefix, so pytest does not collect it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO.parent / "shared" / "reference"
DEMO_CONFIG = REPO / "configs" / "dfine_n_demo.yml"
DEMO_NAMES = ["circle", "square", "triangle", "cross", "star", "ring"]

# the reference configs/dfine/dfine_hgnetv2_n_coco.yml encoder section
N_ENCODER = dict(in_channels=[512, 1024], feat_strides=[16, 32], hidden_dim=128, use_encoder_idx=[1],
                 dim_feedforward=512, expansion=0.34, depth_mult=0.5)


def reference(name: str):
    """A file of ../shared/reference, or a skip naming it when absent."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"reference file {path} not found (../shared/reference beside the repo)")
    return torch.load(path, map_location="cpu", weights_only=True)


def make_demo_checkpoint(path: Path, size: tuple[int, int], overrides=()) -> Path:
    """A demo-model checkpoint in our format (weights + config + classes, category id = label + 1). The seeded
    initialisation gets seeded noise so that the features depend on the image; plain initialisation gives
    nearly tied scores."""
    import dfine

    cfg = dfine.load_config(DEMO_CONFIG, [f"eval_spatial_size=[{size[0]}, {size[1]}]", *overrides])
    torch.manual_seed(0)
    model = dfine.build_model(cfg, load_pretrained=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    classes = {"names": DEMO_NAMES, "label_to_category": {i: i + 1 for i in range(6)}, "remap_mscoco_category": False}
    torch.save({"model": model.state_dict(), "config": cfg, "classes": classes}, path)
    return path


def run_killed_at_epoch_1(monkeypatch, trainer, cfg: dict) -> Path:
    """Run ``trainer.run(cfg)`` until a simulated kill at the start of epoch 1 (after the epoch-0 checkpoint);
    returns the output folder, ready for ``trainer.run(cfg, resume=.../last.pth)``."""
    real_epoch = trainer.train_one_epoch

    def dies_at_epoch_1(*args, epoch, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", dies_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(cfg)
    monkeypatch.setattr(trainer, "train_one_epoch", real_epoch)
    return Path(cfg["output_dir"])
