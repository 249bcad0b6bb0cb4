"""The train step: NaN guard, gradient accumulation, AMP (one code path), fine-tuning load."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dfine.engine.checkpointing import atomic_save, load_for_tuning
from dfine.engine.loop import NonFiniteLossError, StepSettings, TrainState, train_one_epoch
from test_engine_ddp import ToyCriterion, ToyData, ToyDetector, collate

CPU = torch.device("cpu")


def loader(batch_size: int) -> DataLoader:
    return DataLoader(ToyData(), batch_size=batch_size, shuffle=False, collate_fn=collate)


def run_epoch(model, batch_size, criterion=None, **settings):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    state = TrainState()
    scaler = torch.amp.GradScaler("cpu", enabled=settings.get("amp_dtype") == torch.float16 and settings.get("use_amp", False))
    train_one_epoch(model, criterion or ToyCriterion(), loader(batch_size), optimizer, StepSettings(device=CPU, **settings), state, epoch=0, scaler=scaler)
    return state


class NaNOnImages(ToyCriterion):
    """Non-finite loss whenever a batch holds one of ``bad_ids``."""

    def __init__(self, bad_ids):
        super().__init__()
        self.bad_ids = set(bad_ids)

    def forward(self, outputs, targets):
        losses = super().forward(outputs, targets)
        if any(int(t["image_id"]) in self.bad_ids for t in targets):
            losses["loss_l1"] = losses["loss_l1"] * float("nan")
        return losses


def test_non_finite_loss_skips_the_step_and_logs_image_ids(caplog):
    model = ToyDetector()
    with caplog.at_level(logging.WARNING):
        state = run_epoch(model, 4, NaNOnImages({5}))
    assert state.global_step == 3  # 4 batches, one skipped
    assert [entry[2] for entry in state.skipped] == [[4, 5, 6, 7]]
    assert "image ids: [4, 5, 6, 7]" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_non_finite_losses_stop_with_a_clear_error():
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite steps"):
        run_epoch(ToyDetector(), 4, NaNOnImages({4, 8}), max_bad_steps=2)


def test_gradient_accumulation_equals_the_larger_batch():
    a, b = ToyDetector(), ToyDetector()
    run_epoch(a, 4, clip_max_norm=0.1)
    state = run_epoch(b, 2, clip_max_norm=0.1, accumulation=2)
    assert state.global_step == 4
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_path_trains(dtype):
    model = ToyDetector()
    before = [p.detach().clone() for p in model.parameters()]
    state = run_epoch(model, 4, use_amp=True, amp_dtype=dtype)
    assert state.global_step == 4 and state.bad_steps == 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_tuning_skips_and_lists_mismatched_shapes(tmp_path):
    source = ToyDetector()
    source.head = nn.Linear(4, 7)  # another head size
    atomic_save({"model": source.state_dict()}, tmp_path / "w.pth")
    target = ToyDetector()
    report = load_for_tuning(target, tmp_path / "w.pth")
    assert sorted(k for k, _, _ in report.mismatched) == ["head.bias", "head.weight"]
    assert torch.equal(target.conv.weight, source.conv.weight)
    assert not torch.equal(target.head.weight[:4], source.head.weight[:4])
