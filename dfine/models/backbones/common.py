"""What every backbone shares: freezing BatchNorm statistics, and the error raised when pretrained weights
cannot be had."""

from __future__ import annotations

import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d


class PretrainedWeightsError(RuntimeError):
    """The pretrained backbone weights could not be found, downloaded or loaded."""


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by a FrozenBatchNorm2d holding its current statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module
