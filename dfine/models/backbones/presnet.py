"""PResNet: the ResNet-vd family (Bag of Tricks, He et al. 2019) used as the RT-DETR / RT-DETRv2 backbone.

Variant 'd' (the one RT-DETR uses) changes two things in the classic ResNet:
  * the 7x7 stem becomes three 3x3 convs (32, 32, 64 channels), the "deep stem" (also variant 'c');
  * a shortcut that halves the resolution first average-pools (2x2, stride 2) and then applies its 1x1 conv,
    so no activation is skipped by a strided 1x1 conv.
Variant 'a' strides the first 1x1 conv of a bottleneck instead of the 3x3 one.

Depths 18 and 34 use basic blocks (two 3x3 convs), 50 and 101 bottlenecks (1x1, 3x3, 1x1 with 4x expansion).
The four stages have strides 4, 8, 16, 32. Module names equal the reference's (``conv1.conv1_1.conv.weight``,
``res_layers.1.blocks.0.short.conv.norm.running_mean``, ``...branch2a``), so its checkpoints and the
ImageNet weights it publishes load unchanged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dfine.layers.conv import ConvNormAct
from dfine.layers.mlp import mlp_activation
from dfine.models.backbones.common import PretrainedWeightsError, freeze_batchnorm
from dfine.registry import BACKBONES

logger = logging.getLogger(__name__)

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (4, 8, 16, 32)
VARIANTS = ("a", "b", "c", "d")


def make_shortcut(in_channels: int, out_channels: int, stride: int, variant: str) -> nn.Module:
    """1x1 conv-BN projection; for variant 'd' a downsampling one averages 2x2 cells first (keys ``pool``, ``conv``)."""
    if variant == "d" and stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormAct(in_channels, out_channels, 1, 1)),
        ]))
    return ConvNormAct(in_channels, out_channels, 1, stride)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN (ReLU after the first) plus the shortcut, then ReLU. ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: bool, act: str = "relu", variant: str = "d"):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = make_shortcut(in_channels, width, stride, variant)
        self.branch2a = ConvNormAct(in_channels, width, 3, stride, act=act)
        self.branch2b = ConvNormAct(width, width, 3, 1)
        self.act = mlp_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, width, H / stride, W / stride]."""
        short = x if self.shortcut else self.short(x)
        return self.act(self.branch2b(self.branch2a(x)) + short)


class BottleNeck(nn.Module):
    """1x1 (reduce) -> 3x3 -> 1x1 (expand 4x) conv-BN plus the shortcut, then ReLU. ResNet-50/101."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: bool, act: str = "relu", variant: str = "d"):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if variant == "a" else (1, stride)
        out_channels = width * self.expansion
        self.branch2a = ConvNormAct(in_channels, width, 1, stride_1x1, act=act)
        self.branch2b = ConvNormAct(width, width, 3, stride_3x3, act=act)
        self.branch2c = ConvNormAct(width, out_channels, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = make_shortcut(in_channels, out_channels, stride, variant)
        self.act = mlp_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, 4 * width, H / stride, W / stride]."""
        short = x if self.shortcut else self.short(x)
        return self.act(self.branch2c(self.branch2b(self.branch2a(x))) + short)


class Blocks(nn.Module):
    """One stage: ``count`` blocks; the first changes width (projection shortcut) and, except in the first
    stage (which follows the stem's max-pool), halves the resolution."""

    def __init__(self, block: type, in_channels: int, width: int, count: int, first_stage: bool, act: str, variant: str):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            stride = 2 if i == 0 and not first_stage else 1
            self.blocks.append(block(in_channels, width, stride, shortcut=i > 0, act=act, variant=variant))
            in_channels = width * block.expansion

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@BACKBONES.register
class PResNet(nn.Module):
    """ResNet-vd backbone returning the feature maps of the stages in ``return_idx``.

    Args (names as in the reference YAML):
        depth: 18, 34, 50 or 101.
        variant: 'a', 'b', 'c' or 'd' (see the module docstring; RT-DETR uses 'd').
        num_stages: residual stages built (1..4).
        return_idx: stages whose outputs are returned (strides 4, 8, 16, 32).
        act: activation of every conv that has one.
        freeze_at: -1 freezes nothing; >= 0 freezes the stem and the first ``freeze_at`` stages
            (requires_grad=False).
        freeze_norm: replace every BatchNorm by a FrozenBatchNorm2d (fixed statistics and affine).
        pretrained: False (nothing is read or downloaded), True (the reference's ImageNet weights for this
            depth, downloaded once into $DFINE_HOME/weights, see dfine/weights.py), a URL, or a local .pth file.
    """

    def __init__(
        self,
        depth: int,
        variant: str = "d",
        num_stages: int = 4,
        return_idx: Sequence[int] = (0, 1, 2, 3),
        act: str = "relu",
        freeze_at: int = -1,
        freeze_norm: bool = True,
        pretrained: bool | str = False,
    ):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"PResNet depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}")
        if variant not in VARIANTS:
            raise ValueError(f"PResNet variant must be one of {VARIANTS}, got {variant!r}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"PResNet num_stages must be 1..4, got {num_stages}")
        bad = [i for i in return_idx if not 0 <= i < num_stages]
        if bad:
            raise ValueError(f"PResNet return_idx {list(return_idx)} must name built stages 0..{num_stages - 1}")
        self.depth = depth
        self.return_idx = list(return_idx)

        stem_width = 64
        if variant in ("c", "d"):
            stem = [("conv1_1", 3, stem_width // 2, 3, 2), ("conv1_2", stem_width // 2, stem_width // 2, 3, 1),
                    ("conv1_3", stem_width // 2, stem_width, 3, 1)]
        else:
            stem = [("conv1_1", 3, stem_width, 7, 2)]
        self.conv1 = nn.Sequential(OrderedDict(
            (name, ConvNormAct(c_in, c_out, k, s, act=act)) for name, c_in, c_out, k, s in stem
        ))

        block = BottleNeck if depth >= 50 else BasicBlock
        stage_channels = [w * block.expansion for w in STAGE_WIDTHS]
        self.res_layers = nn.ModuleList()
        in_channels = stem_width
        for i in range(num_stages):
            self.res_layers.append(
                Blocks(block, in_channels, STAGE_WIDTHS[i], BLOCKS_PER_STAGE[depth][i], i == 0, act, variant)
            )
            in_channels = stage_channels[i]
        self.out_channels = [stage_channels[i] for i in self.return_idx]
        self.out_strides = [STAGE_STRIDES[i] for i in self.return_idx]

        if freeze_at >= 0:
            self.conv1.requires_grad_(False)
            for stage in self.res_layers[: min(freeze_at, num_stages)]:
                stage.requires_grad_(False)
        if freeze_norm:
            freeze_batchnorm(self)
        if pretrained:
            self.load_pretrained(pretrained)

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] -> one [B, out_channels[i], H / out_strides[i], W / out_strides[i]] map per returned stage."""
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs

    def load_pretrained(self, pretrained: bool | str) -> None:
        """Load ImageNet weights: True -> the reference URL for this depth, else a URL or a local file."""
        disable = ("set `model.backbone.pretrained: false` (or `-u model.backbone.pretrained=false`, "
                   "or build_model(..., load_pretrained=False))")
        if pretrained is True:  # the released file through the weights cache (dfine/weights.py), checked
            from dfine.weights import WeightsError, fetch

            try:
                pretrained = str(fetch(f"presnet{self.depth}vd"))
            except WeightsError as err:
                raise PretrainedWeightsError(f"PResNet{self.depth}: {err}; or {disable}") from None
        source = str(pretrained)
        is_url = source.startswith(("http://", "https://"))
        try:
            if is_url:
                distributed = dist.is_available() and dist.is_initialized()
                # Rank 0 downloads into the hub cache; the others wait and then read the cached file.
                if distributed and dist.get_rank() != 0:
                    dist.barrier()
                state = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=False, weights_only=True)
                if distributed and dist.get_rank() == 0:
                    dist.barrier()
            else:
                state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - every failure gets the same actionable message
            where = "download from" if is_url else "file"
            raise PretrainedWeightsError(
                f"PResNet{self.depth}: cannot read pretrained weights ({where} {source}: {type(err).__name__}: {err}). "
                f"Download the file by hand and set `model.backbone.pretrained` to its path, or {disable}."
            ) from err
        try:
            self.load_state_dict(state)
        except Exception as err:  # noqa: BLE001
            raise PretrainedWeightsError(
                f"PResNet{self.depth}: the weights in {source} do not fit this backbone ({err}). "
                f"Use the file for depth {self.depth}, or {disable}."
            ) from err
        logger.info("PResNet%d: loaded pretrained weights from %s", self.depth, source)
