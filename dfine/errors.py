"""The errors a user fixes by changing a config, a path, a dataset, a checkpoint, a device or a command-line
argument. Their messages already name the file, key, value or annotation at fault, so the tools print them as one
line (``error: ...``) and exit with status 2 instead of showing a traceback (dfine/cli/common.py: run_tool). Any
other exception is a bug and keeps its traceback."""

from __future__ import annotations

from dfine.checkpoint import CheckpointError
from dfine.data.coco import DatasetError
from dfine.devices import DeviceError
from dfine.engine.distributed import CollectiveTimeout
from dfine.engine.loop import NonFiniteLossError
from dfine.models.backbones.common import PretrainedWeightsError
from dfine.registry import ConfigError


class UsageError(ValueError):
    """A command-line argument that cannot work: a missing input, an output path that cannot be created, a
    threshold outside [0, 1], a size that is no multiple of 32, ... The message names the flag and the value."""


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, CheckpointError, DatasetError, PretrainedWeightsError, NonFiniteLossError, DeviceError, UsageError,
    CollectiveTimeout,
)
