"""How the training loader reads one sample, so that long runs survive and resume exactly:

* every sample draws its augmentation from generators seeded by (seed, epoch, index): the random stream does not
  depend on which worker process loads it, on prefetching or on where a resumed run starts, so a run resumed in
  the middle of an epoch sees exactly the batches the uninterrupted run saw;
* an image that cannot be read any more (deleted or truncated after the pre-flight check) does not raise inside
  a worker process (where the error would come back as a traceback): the next readable image of the dataset takes
  its place, so the batch stays well-formed and every rank keeps the same step, and the substitute's target carries
  a note ``BAD_SAMPLE_KEY: [message naming the file]``. The train loop then stops with that message, or with
  ``skip_bad_samples: true`` logs and counts it.
"""

from __future__ import annotations

import contextlib
import random
import zlib

import numpy as np
import torch

BAD_SAMPLE_KEY = "unreadable_replaced"
MAX_SUBSTITUTES = 16


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that is a pure function of (seed, epoch, index), the same in every process."""
    return zlib.crc32(f"{seed}:{epoch}:{index}".encode())


@contextlib.contextmanager
def seeded_generators(seed: int):
    """Python's, NumPy's and torch's global generators seeded with ``seed`` inside the block and put back after
    it (the training process, which also loads samples when ``num_workers`` is 0, keeps its own streams)."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators belong to the training process
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def load_or_substitute(load, index: int, size: int, error_type: type[Exception]):
    """``load(index)``, or when it raises ``error_type`` (an unreadable image), ``load`` of the next indices in
    turn; returns ``(sample, [messages of the unreadable ones])``. Gives up (re-raising the first error) after
    ``MAX_SUBSTITUTES`` unreadable images in a row: then the data is gone, not one file."""
    notes = []
    for offset in range(min(MAX_SUBSTITUTES, size)):
        try:
            return load((index + offset) % size), notes
        except error_type as err:
            notes.append(str(err))
    raise error_type(notes[0] + f" (and the {len(notes) - 1} images after it)")


def pop_bad_sample_notes(targets: list[dict]) -> list[str]:
    """The unreadable-image messages carried by a batch's targets, removed from them."""
    notes = []
    for target in targets:
        notes += target.pop(BAD_SAMPLE_KEY, None) or []
    return notes
