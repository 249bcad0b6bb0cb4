"""Faults of long runs, on the real D-FINE-N demo config shrunk to a few tiny steps: a kill at a random step,
resumed from the step checkpoint, ends bit for bit where the uninterrupted run ends (one process here; two
processes under torchrun with an elastic restart after a SIGKILL); SIGTERM saves at the step and exits 75; an
image deleted mid-run stops the run naming it or is skipped and counted; a checkpoint write that fails leaves
the previous file intact and stops with one line.

Bit-identical comparisons (torch.equal) are exact by construction: the same machine, thread count and operation
order replay the same floats; any difference is a resume bug, not noise."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import dfine.engine.checkpointing as checkpointing
import dfine.engine.loop as loop
from dfine.cli.train import main as train_main
from dfine.engine import preemption

REPO = Path(__file__).resolve().parents[1]
SIZE = 96  # multi-scale draws 64 or 96: 20 or 45 anchors for 10 queries
STEPS_PER_EPOCH, EPOCHS = 3, 2


def overrides(output_dir: Path, extra=(), images: int = 3, batch: int = 1) -> list[str]:
    """-u overrides of configs/dfine_n_demo.yml: 2 epochs (the second without augmentation, after the phase
    switch) of 3 steps, multi-scale on, one loader worker, a step checkpoint every 2 steps (so at step 2 inside
    epoch 0, step 4 inside epoch 1, and at both epochs' ends)."""
    return [
        f"output_dir={output_dir}", "device=cpu", "seed=7", f"epochs={EPOCHS}", "stop_epoch=1", "print_freq=1",
        f"eval_spatial_size=[{SIZE}, {SIZE}]", "checkpoint_every_steps=2",
        "model.decoder.num_queries=10", "model.decoder.num_denoising=6", "postprocessor.num_top_queries=10",
        "lr_warmup_scheduler.warmup_duration=3", "ema.warmups=3", "ema.restart_decay=0.5",
        f"train_dataloader.dataset.num_images={images}", f"train_dataloader.dataset.image_size={SIZE}",
        "val_dataloader.dataset.num_images=2", f"val_dataloader.dataset.image_size={SIZE}",
        f"train_dataloader.total_batch_size={batch}", "val_dataloader.total_batch_size=2",
        "train_dataloader.num_workers=1", "val_dataloader.num_workers=0",
        f"train_dataloader.collate_fn.base_size={SIZE}", "train_dataloader.collate_fn.base_size_repeat=1",
        *extra,
    ]


# for the tests that need no exact replay: 64 px, single scale (a third of the compute)
SMALL = ["eval_spatial_size=[64, 64]", "train_dataloader.dataset.image_size=64", "val_dataloader.dataset.image_size=64",
         "train_dataloader.collate_fn.base_size=64", "train_dataloader.collate_fn.base_size_repeat=null"]


def train(output_dir: Path, extra=(), resume: str | None = None, **kwargs) -> int:
    argv = ["-c", str(REPO / "configs" / "dfine_n_demo.yml"), "-u", *overrides(output_dir, extra, **kwargs)]
    return train_main(argv + (["-r", resume] if resume else []))


@pytest.fixture(autouse=True)
def synthetic_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DFINE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: one process, no interruption."""
    out = tmp_path_factory.mktemp("faults") / "full"
    os.environ["DFINE_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    try:
        assert train(out) == 0
    finally:
        del os.environ["DFINE_CACHE"]
    return out


def assert_same_final_state(run: Path, reference: Path, rows: bool = True) -> None:
    a, b = (torch.load(d / "last.pth", weights_only=True) for d in (run, reference))
    assert a["global_step"] == b["global_step"] == STEPS_PER_EPOCH * EPOCHS and a["last_epoch"] == EPOCHS - 1
    for part in ("model", "ema"):
        sa, sb = (a[part], b[part]) if part == "model" else (a[part]["module"], b[part]["module"])
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(s[k], t[k]) for k in s)
    if rows:  # the metrics rows: each epoch's mean train losses and the 12 COCO numbers
        ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
        assert [(e["train"], e["eval"]["stats"]) for e in ma["epochs"]] == [(e["train"], e["eval"]["stats"]) for e in mb["epochs"]]


def last_line(stderr: str) -> str:
    return stderr.rstrip("\n").rsplit("\n", 1)[-1]


def fault_at_step(monkeypatch, step: int, action) -> None:
    """Run ``action()`` at the start of optimizer step ``step`` (1-based), before its forward pass."""
    real, calls = loop.image_ids, [0]

    def with_fault(targets):
        calls[0] += 1
        if calls[0] == step:
            action()
        return real(targets)

    monkeypatch.setattr(loop, "image_ids", with_fault)


def test_kill_at_a_random_step_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, uninterrupted):
    step = random.randint(1, STEPS_PER_EPOCH * EPOCHS)  # any step must do; the value is in the failure message

    def kill():
        raise KeyboardInterrupt(f"simulated kill at step {step}")

    fault_at_step(monkeypatch, step, kill)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(out)
    monkeypatch.undo()
    saved = torch.load(out / "last.pth", weights_only=True) if (out / "last.pth").exists() else None
    # checkpoints: every 2 steps (2, 4, 6) and at the epochs' ends (3, 6); `step` itself had not started
    assert (saved["global_step"] if saved else 0) == max([0] + [c for c in (2, 3, 4, 6) if c < step]), f"killed at step {step}"
    torch.manual_seed(12345)  # a fresh process would not share our generator state either
    assert train(out, resume="auto") == 0, f"killed at step {step}"
    assert_same_final_state(out, uninterrupted)


def test_sigterm_saves_at_the_step_and_exits_75_then_resume_continues_exactly(tmp_path, monkeypatch, uninterrupted):
    fault_at_step(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "preempted"
    assert train(out) == preemption.PREEMPTED_EXIT_CODE == 75
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone after the run
    saved = torch.load(out / "last.pth", weights_only=True)
    # step 5 is the second of epoch 1: saved at its end, although checkpoint_every_steps is 2
    assert saved["global_step"] == 5 and saved["last_epoch"] == 0
    assert (saved["epoch_position"]["epoch"], saved["epoch_position"]["batch"]) == (1, 2)
    assert "stopped on request after optimizer step 5" in (out / "train.log").read_text()
    assert train(out, resume="auto") == 0
    assert_same_final_state(out, uninterrupted)


def test_a_second_stop_signal_gets_the_default_action():
    with preemption.StopSignalHandler():
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested()
        # the next SIGTERM or SIGUSR1 would end the process at once (not delivered here: it would end pytest)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL == signal.getsignal(signal.SIGUSR1)
    assert not preemption.requested()


def last_batch_image(output_dir: Path, extra: list[str]) -> Path:
    """The file of the first image of epoch 0's last batch (the run's sampler order), generating the data."""
    import dfine
    from dfine.config import load_config

    cfg = load_config(REPO / "configs" / "dfine_n_demo.yml", overrides(output_dir, extra))
    loader = dfine.build_dataloader(cfg, "train")
    loader.set_epoch(0)
    *_, last = iter(loader.batch_sampler)
    dataset = loader.dataset
    return dataset.img_folder / dataset.images[last[0][0]]["file_name"]


@pytest.mark.parametrize("skip", [False, True])
def test_an_image_deleted_mid_run_stops_naming_it_or_is_skipped_and_counted(tmp_path, monkeypatch, capsys, skip):
    """Through a loader worker process, where a raised error would come back as a traceback."""
    monkeypatch.setenv("DFINE_CACHE", str(tmp_path / "cache"))  # a private copy of the data: a file gets deleted
    out = tmp_path / "run"
    extra = [*SMALL, "epochs=1", "stop_epoch=1", "train_dataloader.dataset.num_images=4", f"skip_bad_samples={str(skip).lower()}"]
    victim = last_batch_image(out, extra)
    # at the first step the worker has been asked for batches 0..2 only (prefetch 2): batch 3 is read later
    fault_at_step(monkeypatch, 1, victim.unlink)
    capsys.readouterr()
    code = train(out, extra)
    err = capsys.readouterr().err
    if not skip:
        line = last_line(err)  # the log goes to stderr too; the error is the last line, and one line
        assert code == 2 and line.startswith(f"error: cannot read image {victim}: the file is missing"), err
        assert line.endswith("[epoch 0, batch 3]; set skip_bad_samples: true to skip such images")
        return
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"][0]["unreadable_samples"] == 1
    final = torch.load(out / "last.pth", weights_only=True)
    assert final["unreadable_samples"] == 1 and final["global_step"] == 4  # every step was taken, batches full
    assert f"skipped (replaced by the next image): cannot read image {victim}" in (out / "train.log").read_text()


def _failing_save(payload_bytes: int, error: OSError):
    def save(obj, f):
        f.write(b"\0" * payload_bytes)  # part of the file made it to disk before the device filled up
        raise error

    return save


def test_a_full_disk_during_a_run_keeps_the_previous_checkpoint_and_stops_with_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, calls = torch.save, [0]

    def save(obj, f):
        calls[0] += 1
        if calls[0] == 2:  # the epoch-end last.pth, after the step-2 checkpoint
            _failing_save(1000, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))(obj, f)
        return real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    capsys.readouterr()
    code = train(out, [*SMALL, "epochs=1", "stop_epoch=1", "train_dataloader.num_workers=0"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    line = last_line(err)
    assert code == 2 and line.startswith(f"error: cannot write checkpoint {out / 'last.pth'}: No space left on device ("), err
    assert "GiB free on" in line
    assert torch.load(out / "last.pth", weights_only=True)["global_step"] == 2  # the previous one, intact
    assert not (out / "best.pth").exists()
    assert sorted(p.name for p in out.glob(".last.pth.*")) == []  # no temporary file left behind


def test_a_read_only_location_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Tests run as root, which chmod does not stop: the refusal is simulated where the file would be created."""
    path = tmp_path / "last.pth"
    checkpointing.atomic_save({"global_step": 1}, path)

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
        checkpointing.atomic_save({"global_step": 2}, path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot write checkpoint {path}: Read-only file system (")
    assert "make the folder writable" in message
    assert torch.load(path, weights_only=True) == {"global_step": 1}


def torchrun(out: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args,
        str(REPO / "tests" / "fault_launch.py"), "-c", str(REPO / "configs" / "dfine_n_demo.yml"), "-r", "auto",
        "-u", *overrides(out, ["dist_timeout_minutes=5"], images=6, batch=2),  # a hang fails in minutes, not 30
    ]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_torchrun_elastic_restart_after_a_sigkill_equals_the_uninterrupted_two_process_run(tmp_path, tmp_path_factory):
    cache = {"DFINE_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}
    full = torchrun(tmp_path / "full", env=cache)
    assert full.returncode == 0, full.stderr[-3000:]
    step = random.randint(2, STEPS_PER_EPOCH * EPOCHS)  # rank 1 dies at the start of this step, first attempt only
    fault = {**cache, "DFINE_TEST_FAULT": "sigkill", "DFINE_TEST_FAULT_STEP": str(step), "DFINE_TEST_FAULT_RANK": "1"}
    elastic = torchrun(tmp_path / "elastic", "--max-restarts=1", env=fault)
    assert elastic.returncode == 0, f"killed at step {step}\n" + elastic.stderr[-3000:]
    log = (tmp_path / "elastic" / "train.log").read_text()
    assert log.count("resolved config written") == 2, f"no elastic restart (killed at step {step})"
    assert ("resumed from" in log) == (step > 2), f"killed at step {step}"  # before step 3 there is no checkpoint
    assert_same_final_state(tmp_path / "elastic", tmp_path / "full")
