"""Hybrid encoder of RT-DETR / D-FINE: intra-scale attention on the coarsest map, then cross-scale fusion.

1. ``input_proj``: a 1x1 conv + BN per backbone level, to ``hidden_dim`` channels.
2. AIFI (attention-based intra-scale feature interaction): transformer encoder layers over the tokens of
   the levels in ``use_encoder_idx`` (usually the stride-32 map), with a fixed 2D sine-cosine position
   embedding.
3. CCFF (CNN-based cross-scale feature fusion): a top-down FPN (lateral 1x1 conv, 2x nearest upsampling,
   concatenation, fusion block) and a bottom-up PAN (strided downsampling, concatenation, fusion block).
   ``version='dfine'`` uses D-FINE's blocks (RepNCSPELAN4 fusion, SCDown downsampling, lateral convs without
   activation); ``version='rtdetr'`` uses RT-DETR's (CSP-RepVGG fusion, 3x3 stride-2 conv-BN-act
   downsampling, lateral convs with activation).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from dfine.layers.conv import (
    ConvNormAct, CSPRepLayer, RepNCSPELAN4, SCDown, UpsampledJoin, convert_to_deploy, memory_format_of,
)
from dfine.layers.mlp import mlp_activation
from dfine.layers.position_embedding import sine_cosine_2d
from dfine.registry import ENCODERS

VERSIONS = ("dfine", "rtdetr")


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer: self-attention (position added to queries and keys), then FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1, activation: str = "relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = mlp_activation(activation)

    def forward(self, src: Tensor, pos_embed: Tensor | None = None) -> Tensor:
        """src [B, N, C], pos_embed [1 or B, N, C] -> [B, N, C]."""
        query = src if pos_embed is None else src + pos_embed
        # need_weights=False lets PyTorch use its fused attention kernels
        attended, _ = self.self_attn(query, query, value=src, need_weights=False)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerEncoder(nn.Module):
    """``num_layers`` independent copies of one encoder layer, applied in sequence (keys ``layers.{i}``)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))

    def forward(self, src: Tensor, pos_embed: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos_embed=pos_embed)
        return src


@ENCODERS.register
class HybridEncoder(nn.Module):
    """Multi-scale features -> the same number of fused maps, all ``hidden_dim`` wide.

    Args (names as in the reference YAML):
        in_channels: channels of each backbone level, finest first.
        feat_strides: stride of each level (for the position-embedding grid).
        hidden_dim: width of every encoder feature.
        nhead, dim_feedforward, dropout, enc_act: the AIFI transformer layer.
        use_encoder_idx: levels that go through AIFI; num_encoder_layers: layers per such level (0 skips AIFI).
        pe_temperature: temperature of the sine-cosine embedding.
        expansion: width factor of the fusion blocks; depth_mult: their depth factor (RepVGG blocks =
            round(3 * depth_mult)).
        act: activation of the fusion blocks.
        eval_spatial_size: [H, W] of the input the embedding is precomputed for; other sizes compute theirs.
        version: 'dfine' or 'rtdetr' fusion blocks (see the module docstring).
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (512, 1024, 2048),
        feat_strides: Sequence[int] = (8, 16, 32),
        hidden_dim: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        enc_act: str = "gelu",
        use_encoder_idx: Sequence[int] = (2,),
        num_encoder_layers: int = 1,
        pe_temperature: float = 10000.0,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        act: str = "silu",
        eval_spatial_size: Sequence[int] | None = None,
        version: str = "dfine",
    ):
        super().__init__()
        if len(in_channels) != len(feat_strides):
            raise ValueError(f"in_channels {list(in_channels)} and feat_strides {list(feat_strides)} differ in length")
        if version not in VERSIONS:
            raise ValueError(f"HybridEncoder version must be one of {VERSIONS}, got {version!r}")
        bad = [i for i in use_encoder_idx if not 0 <= i < len(in_channels)]
        if bad:
            raise ValueError(f"use_encoder_idx {list(use_encoder_idx)} has levels outside 0..{len(in_channels) - 1}")
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self.out_channels = [hidden_dim] * len(in_channels)
        self.out_strides = list(feat_strides)
        self.deployed = False

        self.input_proj = nn.ModuleList(
            nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, hidden_dim, kernel_size=1, bias=False)),
                ("norm", nn.BatchNorm2d(hidden_dim)),
            ]))
            for c in in_channels
        )
        layer = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, enc_act)
        self.encoder = nn.ModuleList(TransformerEncoder(layer, num_encoder_layers) for _ in self.use_encoder_idx)

        num_blocks = round(3 * depth_mult)
        dfine = version == "dfine"

        def fusion_block() -> nn.Module:
            if dfine:
                return RepNCSPELAN4(2 * hidden_dim, hidden_dim, 2 * hidden_dim, round(expansion * hidden_dim // 2), num_blocks, act=act)
            return CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion=expansion, act=act)

        num_fusions = len(in_channels) - 1
        self.lateral_convs = nn.ModuleList(ConvNormAct(hidden_dim, hidden_dim, 1, 1, act=None if dfine else act) for _ in range(num_fusions))
        self.fpn_blocks = nn.ModuleList(fusion_block() for _ in range(num_fusions))
        self.downsample_convs = nn.ModuleList(
            nn.Sequential(SCDown(hidden_dim, hidden_dim, 3, 2)) if dfine else ConvNormAct(hidden_dim, hidden_dim, 3, 2, act=act)
            for _ in range(num_fusions)
        )
        self.pan_blocks = nn.ModuleList(fusion_block() for _ in range(num_fusions))

        # not part of the state dict (as in the reference), but follows the module across devices
        for idx in self.use_encoder_idx:
            self.register_buffer(f"pos_embed{idx}", self._eval_position_embedding(idx), persistent=False)

    def _eval_position_embedding(self, idx: int) -> Tensor | None:
        if not self.eval_spatial_size:
            return None
        stride = self.feat_strides[idx]
        height, width = self.eval_spatial_size[0] // stride, self.eval_spatial_size[1] // stride
        return sine_cosine_2d(width, height, self.hidden_dim, self.pe_temperature)

    def position_embedding(self, idx: int, height: int, width: int, like: Tensor) -> Tensor:
        """[1, height * width, hidden_dim] for level ``idx``: the precomputed one when the size matches."""
        cached = getattr(self, f"pos_embed{idx}", None)
        size = self.eval_spatial_size  # may have been cleared or changed since the cache was built
        stride = self.feat_strides[idx]
        if (cached is not None and size and cached.shape[1] == height * width
                and (height, width) == (size[0] // stride, size[1] // stride)):
            return cached.to(dtype=like.dtype)
        return sine_cosine_2d(width, height, self.hidden_dim, self.pe_temperature).to(device=like.device, dtype=like.dtype)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """feats: one [B, in_channels[i], H_i, W_i] map per level (H_i = H / feat_strides[i]), finest first.

        Returns one [B, hidden_dim, H_i, W_i] map per level, finest first.
        """
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder expects {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [proj_layer(feat) for proj_layer, feat in zip(self.input_proj, feats)]
        layout = memory_format_of(feats[-1])

        if self.num_encoder_layers > 0:
            for encoder, idx in zip(self.encoder, self.use_encoder_idx):
                batch, _, height, width = proj[idx].shape
                tokens = proj[idx].permute(0, 2, 3, 1).flatten(1, 2)  # [B, H*W, C], a view (see _flatten_features)
                memory = encoder(tokens, pos_embed=self.position_embedding(idx, height, width, tokens))
                # Back to maps in the layout the backbone used (channels-last in training, see DFINE.forward):
                # an NCHW map here would turn every later concatenation, and so the whole fusion path, NCHW.
                proj[idx] = memory.transpose(1, 2).reshape(batch, self.hidden_dim, height, width).contiguous(
                    memory_format=layout)

        # top-down: coarse to fine; the lateral conv output also replaces the coarse map for the PAN
        inner = [proj[-1]]
        for step, level in enumerate(range(len(proj) - 1, 0, -1)):
            coarse = self.lateral_convs[step](inner[0])
            inner[0] = coarse
            joined = UpsampledJoin(coarse, proj[level - 1])  # the fusion blocks open with 1x1 convs
            inner.insert(0, self.fpn_blocks[step](joined if self.training else joined.build()))

        # bottom-up: fine to coarse
        outs = [inner[0]]
        for step in range(len(proj) - 1):
            downsampled = self.downsample_convs[step](outs[-1])
            outs.append(self.pan_blocks[step](torch.cat([downsampled, inner[step + 1]], dim=1)))
        return outs

    def convert_to_deploy(self) -> "HybridEncoder":
        """Fold BatchNorms and RepVGG branches of the fusion path for inference (eval-mode outputs unchanged)."""
        convert_to_deploy(self)
        self.deployed = True
        return self
