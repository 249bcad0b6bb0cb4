"""The errors a user fixes by changing a config, a path, a dataset, a checkpoint, a device or a command-line
argument. Their messages already name the file, key, value or annotation at fault, so the tools print them as one
line (``error: ...``) and exit with status 2 instead of showing a traceback (dfine/cli/common.py: run_tool). Any
other exception is a bug and keeps its traceback.

This module sits below the engine and the tools: it imports only from the layers under them (checkpoint reading,
data, devices, models, registry), and the errors the engine raises are defined here."""

from __future__ import annotations

from dfine.checkpoint import CheckpointError
from dfine.data.coco import DatasetError
from dfine.devices import DeviceError
from dfine.models.backbones.common import PretrainedWeightsError
from dfine.registry import ConfigError


class UsageError(ValueError):
    """A command-line argument that cannot work: a missing input, an output path that cannot be created, a
    threshold outside [0, 1], a size that is no multiple of 32, ... The message names the flag and the value."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient (raised by dfine/engine/loop.py)."""


class CollectiveTimeout(RuntimeError):
    """A collective (gradient all-reduce, barrier, step check) that did not complete in ``dist_timeout_minutes``
    (raised by the trainer under DDP)."""


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, CheckpointError, DatasetError, PretrainedWeightsError, NonFiniteLossError, DeviceError, UsageError,
    CollectiveTimeout,
)
