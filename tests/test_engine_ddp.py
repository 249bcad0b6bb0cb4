"""2-process gloo DDP on CPU ends with the same parameters as one process with the same total batch, also with
``compile: true`` (the DDP wrapper compiled, dfine/engine/compiling.py)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from dfine.engine.compiling import compile_run_modules
from dfine.engine.distributed import wrap_model
from dfine.engine.ema import ModelEMA
from dfine.engine.loop import StepSettings, TrainState, train_one_epoch
from dfine.engine.optim import LinearWarmup

NUM_IMAGES, TOTAL_BATCH, STEPS_ACCUMULATED = 16, 4, 1


class ToyDetector(nn.Module):
    """conv -> pooled features -> a 'box' per image; enough to exercise forward/backward/DDP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 4)

    def forward(self, images, targets=None):
        return {"pred_boxes": self.head(self.conv(images).mean(dim=(2, 3)))}


class ToyCriterion(nn.Module):
    def forward(self, outputs, targets):
        boxes = torch.stack([t["boxes"][0] for t in targets])
        return {"loss_l1": (outputs["pred_boxes"] - boxes).abs().mean(), "loss_l2": ((outputs["pred_boxes"] - boxes) ** 2).mean()}


class ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return NUM_IMAGES

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 8, 8, generator=g), {"boxes": torch.rand(1, 4, generator=g), "image_id": torch.tensor([i])}


def collate(items):
    return torch.stack([x for x, _ in items]), [t for _, t in items]


def train(world_size: int, rank: int, compile: bool = False) -> dict:
    model = ToyDetector()
    dataset = ToyData()
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=TOTAL_BATCH // world_size, sampler=sampler, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    warmup = LinearWarmup(optimizer, 3)
    ema = ModelEMA(model, decay=0.99, warmups=2)
    settings = StepSettings(device=torch.device("cpu"), clip_max_norm=0.1)
    state = TrainState()
    train_model = wrap_model(model, torch.device("cpu"))
    if compile:
        compile_run_modules(model, ema, num_sizes=1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        train_one_epoch(train_model, ToyCriterion(), loader, optimizer, settings, state, epoch=epoch, scaler=scaler, ema=ema, lr_warmup_scheduler=warmup)
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "ema": ema.state_dict()["module"], "steps": state.global_step}


def _worker(rank: int, world_size: int, port: int, out_path: str, compile: bool = False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = train(world_size, rank, compile)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_two_process_gloo_matches_single_process(tmp_path, compile):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    single = train(1, 0)  # eager: the compiled DDP run must match it within the same bounds
    out = tmp_path / "ddp.pth"
    mp.spawn(_worker, args=(2, free_port(), str(out), compile), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert ddp["steps"] == single["steps"] == 2 * NUM_IMAGES // TOTAL_BATCH
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ddp["ema"][key], single["ema"][key], rtol=1e-5, atol=1e-6)
    # and training did move the weights
    assert not torch.allclose(single["model"]["head.weight"], ToyDetector().head.weight)
