"""HGNetV2 (PP-HGNetV2, PaddlePaddle), the D-FINE backbone, variants B0..B6.

A stem (stride 4) and four stages (strides 4, 8, 16, 32). Each stage is an optional depthwise strided
conv followed by HG blocks: a chain of convs whose outputs are all concatenated with the block input and
aggregated by two 1x1 convs (squeeze to half width, then expand); blocks after the first add a residual.
Stages 3 and 4 use "light" layers (1x1 conv, then a depthwise conv). With ``use_lab`` every activated conv
is followed by a learnable affine block (LAB: one scalar scale and bias).

Module and parameter names equal the reference (``stem.stem1.conv.weight``, ``stages.2.blocks.0.layers.1
.conv2.bn.running_mean``, ...) so its checkpoints and the ImageNet "stage1" weights load as they are.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dfine.layers.conv import add_fresh
from dfine.models.backbones.common import PretrainedWeightsError, freeze_batchnorm
from dfine.registry import BACKBONES

logger = logging.getLogger(__name__)


# per stage: in, mid, out channels, HG blocks, downsample first, light layers, kernel size, layers per block
ARCHS: dict[str, dict] = {
    "B0": {"stem": (3, 16, 16), "stages": [
        (16, 16, 64, 1, False, False, 3, 3), (64, 32, 256, 1, True, False, 3, 3),
        (256, 64, 512, 2, True, True, 5, 3), (512, 128, 1024, 1, True, True, 5, 3)]},
    "B1": {"stem": (3, 24, 32), "stages": [
        (32, 32, 64, 1, False, False, 3, 3), (64, 48, 256, 1, True, False, 3, 3),
        (256, 96, 512, 2, True, True, 5, 3), (512, 192, 1024, 1, True, True, 5, 3)]},
    "B2": {"stem": (3, 24, 32), "stages": [
        (32, 32, 96, 1, False, False, 3, 4), (96, 64, 384, 1, True, False, 3, 4),
        (384, 128, 768, 3, True, True, 5, 4), (768, 256, 1536, 1, True, True, 5, 4)]},
    "B3": {"stem": (3, 24, 32), "stages": [
        (32, 32, 128, 1, False, False, 3, 5), (128, 64, 512, 1, True, False, 3, 5),
        (512, 128, 1024, 3, True, True, 5, 5), (1024, 256, 2048, 1, True, True, 5, 5)]},
    "B4": {"stem": (3, 32, 48), "stages": [
        (48, 48, 128, 1, False, False, 3, 6), (128, 96, 512, 1, True, False, 3, 6),
        (512, 192, 1024, 3, True, True, 5, 6), (1024, 384, 2048, 1, True, True, 5, 6)]},
    "B5": {"stem": (3, 32, 64), "stages": [
        (64, 64, 128, 1, False, False, 3, 6), (128, 128, 512, 2, True, False, 3, 6),
        (512, 256, 1024, 5, True, True, 5, 6), (1024, 512, 2048, 2, True, True, 5, 6)]},
    "B6": {"stem": (3, 48, 96), "stages": [
        (96, 96, 192, 2, False, False, 3, 6), (192, 192, 512, 3, True, False, 3, 6),
        (512, 384, 1024, 6, True, True, 5, 6), (1024, 768, 2048, 3, True, True, 5, 6)]},
}
STAGE_STRIDES = (4, 8, 16, 32)


class _ScalarAffine(torch.autograd.Function):
    """``x * scale + bias`` for one-element ``scale`` and ``bias``, forward with the reference's two roundings.

    Autograd's own form of the backward materialises ``grad * x`` (a full map) only to sum it into the scale's
    gradient; here that sum is one dot product over the two maps. HGNetV2's LABs sit on its largest maps (B0:
    [B, 16, 320, 320] in the stem), where these passes are a noticeable part of a D-FINE-N training step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale)
        return torch.mul(x, scale).add_(bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, scale = ctx.saved_tensors
        grad_x = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[1]:
            # the same dtype (AMP: a float32 gradient meets a bfloat16/float16 map) and memory order: a flat dot
            if grad.dtype == x.dtype and grad.stride() == x.stride() and _is_dense(x):
                grad_scale = torch.dot(_flat(grad), _flat(x)).reshape(1)
            else:
                grad_scale = (grad * x).sum().reshape(1)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum().reshape(1)
        return grad_x, grad_scale, grad_bias


def _exporting() -> bool:
    """Tracing, ONNX export or torch.compile: they get the plain module forms (MaxPool2d, scale * x + bias)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def _is_dense(x: Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _flat(x: Tensor) -> Tensor:
    """A dense map's elements in memory order, as a 1-D view."""
    return x.as_strided((x.numel(),), (1,))


class LearnableAffineBlock(nn.Module):
    """y = scale * x + bias with one learnable scalar each (HGNetV2's LAB)."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale_value]))
        self.bias = nn.Parameter(torch.tensor([bias_value]))

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        if inplace:  # the same two roundings, without two new maps
            return x.mul_(self.scale).add_(self.bias)
        if torch.is_grad_enabled() and not _exporting():
            return _ScalarAffine.apply(x, self.scale, self.bias)
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BatchNorm (key ``bn``) -> ReLU -> LAB; no ReLU and no LAB when ``use_act`` is False.

    Kept here rather than in dfine/layers because its key layout (``bn``, ``lab``) is HGNetV2's own.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 use_act: bool = True, use_lab: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        # in place: the BatchNorm output is used by nothing else, and ReLU's backward needs only its output
        self.act = nn.ReLU(inplace=True) if use_act else nn.Identity()
        self.lab = LearnableAffineBlock() if use_act and use_lab else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn(self.conv(x)))
        if isinstance(self.lab, LearnableAffineBlock):
            return self.lab(x, inplace=not torch.is_grad_enabled())  # x is this block's own fresh map
        return x


class LightConvBNAct(nn.Module):
    """1x1 conv-BN (no activation), then a depthwise kxk conv-BN-ReLU(-LAB)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, use_lab: bool = False):
        super().__init__()
        self.conv1 = ConvBNAct(in_chs, out_chs, 1, use_act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(out_chs, out_chs, kernel_size, groups=out_chs, use_act=True, use_lab=use_lab)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


def _max_of_2x2_windows(x: Tensor) -> Tensor:
    """``MaxPool2d(2, stride=1)`` as the maximum of the four shifted views: the same values (a maximum is exact
    and NaN-propagating either way) at a 30-50th of the time on CPU, where max_pool2d has no fast NCHW kernel for
    this window (16 ms vs 0.3 ms on D-FINE-S's 16 x 321 x 321 stem map). Eager and without autograd only: on ties
    max-pool sends the whole gradient to one input, torch.maximum splits it; exporters and compilers get the pool."""
    out = torch.maximum(x[..., :-1, :-1], x[..., :-1, 1:])
    torch.maximum(out, x[..., 1:, :-1], out=out)
    return torch.maximum(out, x[..., 1:, 1:], out=out)


class StemBlock(nn.Module):
    """Stride-4 stem: 3x3/2 conv, then a max-pool branch and a two-conv 2x2 branch, concatenated, 3x3/2, 1x1."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, use_lab: bool = False):
        super().__init__()
        self.stem1 = ConvBNAct(in_chs, mid_chs, 3, stride=2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid_chs, mid_chs // 2, 2, use_lab=use_lab)
        self.stem2b = ConvBNAct(mid_chs // 2, mid_chs, 2, use_lab=use_lab)
        self.stem3 = ConvBNAct(mid_chs * 2, mid_chs, 3, stride=2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid_chs, out_chs, 1, use_lab=use_lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, out_chs, H / 4, W / 4]."""
        x = F.pad(self.stem1(x), (0, 1, 0, 1))  # 2x2 kernels keep the size only with one extra row/column
        branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        pooled = self.pool(x) if x.requires_grad or _exporting() else _max_of_2x2_windows(x)
        x = torch.cat([pooled, branch], dim=1)
        return self.stem4(self.stem3(x))


class HGBlock(nn.Module):
    """``layer_num`` chained convs; input and every output concatenated, squeezed to out/2 then out (1x1 each)."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, layer_num: int, kernel_size: int = 3,
                 residual: bool = False, light_block: bool = False, use_lab: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList()
        for i in range(layer_num):
            chs = in_chs if i == 0 else mid_chs
            if light_block:
                self.layers.append(LightConvBNAct(chs, mid_chs, kernel_size, use_lab=use_lab))
            else:
                self.layers.append(ConvBNAct(chs, mid_chs, kernel_size, use_lab=use_lab))
        total_chs = in_chs + layer_num * mid_chs
        self.aggregation = nn.Sequential(
            ConvBNAct(total_chs, out_chs // 2, 1, use_lab=use_lab),
            ConvBNAct(out_chs // 2, out_chs, 1, use_lab=use_lab),
        )

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        y = self.aggregation(torch.cat(outputs, dim=1))
        return add_fresh(y, x) if self.residual else y


class HGStage(nn.Module):
    """Optional depthwise 3x3/2 conv-BN (no activation), then ``block_num`` HG blocks (residual after the first)."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, block_num: int, layer_num: int, downsample: bool = True,
                 light_block: bool = False, kernel_size: int = 3, use_lab: bool = False):
        super().__init__()
        self.downsample = (
            ConvBNAct(in_chs, in_chs, 3, stride=2, groups=in_chs, use_act=False, use_lab=use_lab) if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(*[
            HGBlock(in_chs if i == 0 else out_chs, mid_chs, out_chs, layer_num, kernel_size=kernel_size,
                    residual=i > 0, light_block=light_block, use_lab=use_lab)
            for i in range(block_num)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


@BACKBONES.register
class HGNetV2(nn.Module):
    """HGNetV2 backbone returning the feature maps of the stages in ``return_idx``.

    Args (names as in the reference YAML):
        name: variant, 'B0'..'B6'.
        use_lab: learnable affine blocks after activations.
        return_idx: stages to return (0..3, strides 4, 8, 16, 32).
        freeze_at: -1 freezes nothing; >= 0 freezes the stem, and with ``freeze_stem_only=False`` also
            stages 0..freeze_at (parameters get requires_grad=False).
        freeze_stem_only: see ``freeze_at``.
        freeze_norm: replace every BatchNorm by a FrozenBatchNorm2d (fixed statistics and affine).
        pretrained: load the ImageNet weights ``PPHGNetV2_{name}_stage1.pth``: from ``local_model_dir`` when
            the file is there, else downloaded from the reference's release into ``local_model_dir``.
            With False nothing is read or downloaded.
        local_model_dir: folder of the pretrained file, or the path of the file itself.
    """

    def __init__(
        self,
        name: str,
        use_lab: bool = False,
        return_idx: Sequence[int] = (1, 2, 3),
        freeze_stem_only: bool = True,
        freeze_at: int = 0,
        freeze_norm: bool = True,
        pretrained: bool = True,
        local_model_dir: str = "weight/hgnetv2/",
    ):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"unknown HGNetV2 variant `{name}`; known: {', '.join(ARCHS)}")
        bad = [i for i in return_idx if not 0 <= i < 4]
        if bad:
            raise ValueError(f"HGNetV2 return_idx {list(return_idx)} must name stages 0..3")
        self.name = name
        self.use_lab = use_lab
        self.return_idx = list(return_idx)
        arch = ARCHS[name]
        self.out_channels = [arch["stages"][i][2] for i in self.return_idx]
        self.out_strides = [STAGE_STRIDES[i] for i in self.return_idx]

        self.stem = StemBlock(*arch["stem"], use_lab=use_lab)
        self.stages = nn.ModuleList(
            HGStage(in_c, mid_c, out_c, blocks, layers, downsample, light, kernel, use_lab)
            for in_c, mid_c, out_c, blocks, downsample, light, kernel, layers in arch["stages"]
        )

        if freeze_at >= 0:
            self.stem.requires_grad_(False)
            if not freeze_stem_only:
                for stage in self.stages[: freeze_at + 1]:
                    stage.requires_grad_(False)
        if freeze_norm:
            freeze_batchnorm(self)
        if pretrained:
            self.load_pretrained(local_model_dir)

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] -> one [B, out_channels[i], H / out_strides[i], W / out_strides[i]] map per returned stage."""
        x = self.stem(x)
        outs = []
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs

    def load_pretrained(self, local_model_dir: str) -> None:
        """Load the ImageNet weights: ``local_model_dir``'s copy when there is one (the reference's place),
        else the released file through the weights cache (dfine/weights.py: downloaded once, checked)."""
        from dfine.weights import WeightsError, fetch, get_entry

        entry = get_entry(f"hgnetv2_{self.name.lower()}")
        url, file_name = entry.url, entry.file_name
        path = local_model_dir if os.path.isfile(local_model_dir) else os.path.join(local_model_dir, file_name)
        disable = "set `model.backbone.pretrained: false` (or `-u model.backbone.pretrained=false`, or build_model(..., load_pretrained=False))"
        if not os.path.isfile(path):
            try:
                path = str(fetch(entry))
            except WeightsError as err:
                raise PretrainedWeightsError(f"HGNetV2-{self.name}: {err}; or {disable}") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.load_state_dict(state)
        except Exception as err:  # noqa: BLE001
            raise PretrainedWeightsError(
                f"HGNetV2-{self.name}: cannot load pretrained weights from {path} ({type(err).__name__}: {err}). "
                f"Replace the file (source: {url}) or {disable}."
            ) from err
        logger.info("HGNetV2-%s: loaded pretrained weights from %s", self.name, path)
