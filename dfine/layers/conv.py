"""Convolution building blocks of the hybrid encoders (D-FINE and RT-DETR), one copy each.

Attribute names follow the reference checkpoints (``conv``, ``norm``, ``cv1``..``cv4``, ``bottlenecks``) so
released weights load unchanged. Blocks with a ``convert_to_deploy()`` method fold their BatchNorm (and, for
RepVGG, their parallel branches) into one biased convolution for inference; the folded module computes the
same function as the eval-mode original.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dfine.layers.mlp import mlp_activation


def add_fresh(fresh: Tensor, other: Tensor) -> Tensor:
    """``fresh + other`` where ``fresh`` is a map nothing else holds: summed into it when autograd is off (the same
    sums, one map fewer to allocate and fill: eval on CPU is bound by memory traffic as much as by FLOPs)."""
    return fresh.add_(other) if not torch.is_grad_enabled() else fresh + other


def activate(act: nn.Module, fresh: Tensor) -> Tensor:
    """``act(fresh)``, in place on a map nothing else holds when autograd is off, for ReLU and SiLU (their in-place
    and out-of-place kernels compute the same expression); any other activation runs as it is."""
    if not torch.is_grad_enabled() and isinstance(act, (nn.ReLU, nn.SiLU)):
        return F.relu_(fresh) if isinstance(act, nn.ReLU) else F.silu(fresh, inplace=True)
    return act(fresh)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for an NHWC-strided 4-D map (dense or a channel slice of one), else the NCHW default."""
    if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class UpsampledJoin(NamedTuple):
    """``cat([2x nearest upsample of coarse, lateral], dim=1)``, an FPN block's input, left unbuilt in training.

    The block's first convs read it through ``conv_of``: a bias-free 1x1 conv is linear per pixel, so its product
    with the upsampled part equals the upsampled product with the coarse map, which costs a quarter of the MACs
    (forward and backward) and needs neither the concatenation nor its split in the backward. The same function
    up to rounding (two partial sums instead of one); eval builds the concatenation and stays exact.
    """

    coarse: Tensor
    lateral: Tensor

    def build(self) -> Tensor:
        return torch.cat([F.interpolate(self.coarse, scale_factor=2.0, mode="nearest"), self.lateral], dim=1)


def conv_of(conv: nn.Conv2d, x: Tensor | UpsampledJoin) -> Tensor:
    """``conv(x)``; for an UpsampledJoin, computed per part when the conv is a plain 1x1 (see UpsampledJoin)."""
    if not isinstance(x, UpsampledJoin):
        return conv(x)
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.bias is not None:
        return conv(x.build())
    split = x.coarse.shape[1]
    coarse = F.interpolate(F.conv2d(x.coarse, conv.weight[:, :split]), scale_factor=2.0, mode="nearest")
    return F.conv2d(x.lateral, conv.weight[:, split:]) + coarse


def fold_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the single convolution equal to ``norm(conv(x))`` with the norm's running statistics."""
    scale = norm.weight / (norm.running_var + norm.eps).sqrt()
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight.detach(), bias.detach()


class ConvNormAct(nn.Module):
    """Conv2d -> BatchNorm2d -> activation (``act=None`` means none); 'same' padding for odd kernels.

    Keys: ``conv.weight``, ``norm.*``; after ``convert_to_deploy()``: ``conv_bn_fused.weight/bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        padding: int | None = None,
        bias: bool = False,
        act: str | None = None,
    ):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=padding, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = mlp_activation(act)
        self.deployed = False

    def forward(self, x: Tensor | UpsampledJoin) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H / stride, W / stride]."""
        x = conv_of(self.conv_bn_fused, x) if self.deployed else self.norm(conv_of(self.conv, x))
        return activate(self.act, x)

    @torch.no_grad()
    def convert_to_deploy(self) -> None:
        if self.deployed:
            return
        weight, bias = fold_batchnorm(self.conv, self.norm)
        c = self.conv
        fused = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups, bias=True)
        fused = fused.to(device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.conv_bn_fused = fused
        del self.conv, self.norm
        self.deployed = True


class RepVGGBlock(nn.Module):
    """RepVGG block (Ding et al. 2021): a 3x3 conv-BN branch plus a 1x1 conv-BN branch, summed, then ``act``.

    ``convert_to_deploy()`` re-parameterises both branches into one 3x3 convolution stored as ``conv``.
    """

    def __init__(self, in_channels: int, out_channels: int, act: str | None = "relu"):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, 1, padding=1)
        self.conv2 = ConvNormAct(in_channels, out_channels, 1, 1, padding=0)
        self.act = mlp_activation(act)
        self.deployed = False

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H, W]."""
        if self.deployed:
            return activate(self.act, self.conv(x))
        return activate(self.act, add_fresh(self.conv1(x), self.conv2(x)))

    @torch.no_grad()
    def convert_to_deploy(self) -> None:
        if self.deployed:
            return
        w3, b3 = fold_batchnorm(self.conv1.conv, self.conv1.norm)
        w1, b1 = fold_batchnorm(self.conv2.conv, self.conv2.norm)
        fused = nn.Conv2d(w3.shape[1], w3.shape[0], 3, 1, padding=1, bias=True).to(device=w3.device, dtype=w3.dtype)
        # a 1x1 kernel is the centre tap of a zero 3x3 kernel
        fused.weight.copy_(w3 + F.pad(w1, [1, 1, 1, 1]))
        fused.bias.copy_(b3 + b1)
        self.conv = fused
        del self.conv1, self.conv2
        self.deployed = True


class CSPRepLayer(nn.Module):
    """Cross-stage-partial layer with RepVGG bottlenecks (RT-DETR's CCFF block; D-FINE's ``CSPLayer``).

    Two 1x1 projections of the input; one goes through ``num_blocks`` RepVGG blocks, the two are summed and
    projected to ``out_channels`` (``conv3``, an identity when the hidden width already equals it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int = 3,
        expansion: float = 1.0,
        bias: bool = False,
        act: str | None = "silu",
    ):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormAct(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormAct(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[RepVGGBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = ConvNormAct(hidden, out_channels, 1, 1, bias=bias, act=act) if hidden != out_channels else nn.Identity()

    def forward(self, x: Tensor | UpsampledJoin) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H, W]."""
        return self.conv3(add_fresh(self.bottlenecks(self.conv1(x)), self.conv2(x)))


class RepNCSPELAN4(nn.Module):
    """GELAN block of YOLOv9 with CSP-RepVGG stages, D-FINE's FPN/PAN fusion block.

    ``cv1`` projects to ``c3`` channels and splits them in halves; the second half goes through two
    (CSP-RepVGG -> 3x3 conv) stages of width ``c4``; both halves and both stage outputs are concatenated
    and ``cv4`` projects them to ``c2``.

    Args:
        c1: input channels; c2: output channels; c3: split width (even); c4: stage width;
        n: RepVGG blocks per CSP layer; act: activation of every conv.
    """

    def __init__(self, c1: int, c2: int, c3: int, c4: int, n: int = 3, bias: bool = False, act: str | None = "silu"):
        super().__init__()
        self.half = c3 // 2
        self.cv1 = ConvNormAct(c1, c3, 1, 1, bias=bias, act=act)
        self.cv2 = nn.Sequential(CSPRepLayer(self.half, c4, n, 1.0, bias=bias, act=act), ConvNormAct(c4, c4, 3, 1, bias=bias, act=act))
        self.cv3 = nn.Sequential(CSPRepLayer(c4, c4, n, 1.0, bias=bias, act=act), ConvNormAct(c4, c4, 3, 1, bias=bias, act=act))
        self.cv4 = ConvNormAct(c3 + 2 * c4, c2, 1, 1, bias=bias, act=act)

    def forward(self, x: Tensor | UpsampledJoin) -> Tensor:
        """[B, c1, H, W] -> [B, c2, H, W]."""
        first, second = self.cv1(x).split((self.half, self.half), dim=1)
        # A channel slice is dense only for NCHW at batch 1; both 1x1 convs of the CSP layer would copy it each.
        second = second.contiguous(memory_format=memory_format_of(second))
        stage2 = self.cv2(second)
        stage3 = self.cv3(stage2)
        return self.cv4(torch.cat([first, second, stage2, stage3], dim=1))


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling (YOLOv10): a 1x1 conv for channels, then a depthwise strided conv.

    Neither conv has an activation, as in the reference D-FINE encoder.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.cv1 = ConvNormAct(in_channels, out_channels, 1, 1)
        self.cv2 = ConvNormAct(out_channels, out_channels, kernel_size, stride, groups=out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H / stride, W / stride]."""
        return self.cv2(self.cv1(x))


def convert_to_deploy(module: nn.Module) -> nn.Module:
    """Fold every block below ``module`` that knows how (see ``convert_to_deploy`` methods); returns ``module``."""
    for child in list(module.modules()):
        if child is not module and hasattr(child, "convert_to_deploy") and not getattr(child, "deployed", False):
            child.convert_to_deploy()
    return module
