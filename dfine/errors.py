"""The errors a user fixes by changing a config, a path, a dataset or a checkpoint. Their messages already
name the file, key or annotation at fault, so the tools print them as one line instead of a traceback."""

from __future__ import annotations

from dfine.checkpoint import CheckpointError
from dfine.data.coco import DatasetError
from dfine.engine.distributed import CollectiveTimeout
from dfine.engine.loop import NonFiniteLossError
from dfine.models.backbones.hgnetv2 import PretrainedWeightsError
from dfine.registry import ConfigError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, CheckpointError, DatasetError, PretrainedWeightsError, NonFiniteLossError, CollectiveTimeout,
)
