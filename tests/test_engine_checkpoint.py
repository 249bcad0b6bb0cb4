"""Atomic checkpoints survive a kill mid-write; RNG state and the Objects365 -> COCO head mapping."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from dfine.engine.checkpointing import (
    OBJ365_INDEX_OF_COCO_CLASS,
    atomic_save,
    capture_rng_state,
    map_class_rows,
    restore_rng_state,
)

WRITER = """
import sys, torch
from dfine.engine.checkpointing import atomic_save
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic_save({"model": {"w": torch.full((4_000_000,), float(i))}, "last_epoch": i}, path)
    print(i, flush=True)
"""


def test_kill_during_save_never_leaves_a_corrupt_file(tmp_path):
    path = tmp_path / "last.pth"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            proc.stdout.readline()  # at least one complete save exists
            time.sleep(0.05 + 0.13 * attempt)  # then kill at some point inside a later save
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        ckpt = torch.load(path, weights_only=True)
        value = ckpt["last_epoch"]
        assert torch.equal(ckpt["model"]["w"], torch.full((4_000_000,), float(value)))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pth"]
    # a killed writer may leave its temporary file, never a half-written last.pth
    assert all(name.startswith(".last.pth.") for name in leftovers)


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    atomic_save({"rng": capture_rng_state()}, tmp_path / "r.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "r.pth", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_objects365_rows_map_onto_coco_and_back():
    obj365 = torch.arange(366, dtype=torch.float32)[:, None].repeat(1, 3)
    coco = torch.zeros(80, 3)
    mapped = map_class_rows(coco, obj365)
    # COCO class k takes Objects365 row (index of k) + 1
    assert mapped[0, 0].item() == OBJ365_INDEX_OF_COCO_CLASS[0] + 1
    assert mapped[79, 0].item() == OBJ365_INDEX_OF_COCO_CLASS[79] + 1
    back = map_class_rows(torch.zeros(366, 3), mapped)
    assert back[OBJ365_INDEX_OF_COCO_CLASS[5] + 1, 0].item() == OBJ365_INDEX_OF_COCO_CLASS[5] + 1
    assert map_class_rows(torch.zeros(10, 3), obj365) is None  # neither COCO nor Objects365


def test_atomic_writes_replace_whole_files_with_umask_permissions(tmp_path):
    """Checkpoints, configs, metrics and plots all go through atomic_write: a failed block leaves the old file
    and no temporary one; a finished one has the permissions the umask gives a new file (not mkstemp's 0600)."""
    import stat

    from dfine.utils.files import atomic_write

    path = tmp_path / "sub" / "metrics.json"
    with atomic_write(path, "w") as f:
        f.write("old")
    try:
        with atomic_write(path, "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["metrics.json"]
    previous = os.umask(0o022)
    try:
        atomic_save({"x": 1}, tmp_path / "last.pth")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "last.pth").stat().st_mode) == 0o644
