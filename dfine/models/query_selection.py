"""The encoder side of a DETR decoder head, shared by D-FINE and RT-DETRv2 (D-FINE inherited it unchanged):
project and flatten the encoder levels, score every position, keep the top ``num_queries`` as the initial
queries, and build the contrastive denoising group. Each decoder subclasses ``QuerySelectionDecoder`` and adds
its own refinement layers and heads.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from dfine.layers.deformable_attention import SAMPLING_METHODS
from dfine.layers.mlp import MLP
from dfine.models.denoising import DenoisingGroup, contrastive_denoising_group

QUERY_SELECT_METHODS = ("default", "agnostic", "one2many")


def bias_for_prior(prob: float) -> float:
    """Bias that makes sigmoid(bias) == prob (focal-loss style prior)."""
    return -math.log((1 - prob) / prob)


def generate_anchors(
    spatial_shapes: Sequence[Sequence[int]], grid_size: float = 0.05, eps: float = 1e-2, device=None
) -> tuple[Tensor, Tensor]:
    """One anchor box per feature position: its cell centre, size grid_size * 2**level.

    Returns:
        anchors [1, L, 4] cxcywh in logit space (+inf where invalid), valid_mask [1, L, 1] bool
        (all coordinates inside (eps, 1 - eps)).
    """
    levels = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.arange(int(h)), torch.arange(int(w)), indexing="ij")
        centres = (torch.stack([xs, ys], -1) + 0.5) / torch.tensor([w, h], dtype=torch.float32)
        sizes = torch.full_like(centres, grid_size * 2.0**level)
        levels.append(torch.cat([centres, sizes], -1).reshape(1, -1, 4))
    anchors = torch.cat(levels, 1).to(device)
    valid_mask = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    return torch.where(valid_mask, anchors, torch.inf), valid_mask


class _ValueWithGradientOf(torch.autograd.Function):
    """Forward: ``value``; backward: the incoming gradient goes to ``carrier`` (same shape) instead."""

    @staticmethod
    def forward(ctx, value: Tensor, carrier: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def scored_rows(gathered: Tensor, head: nn.Module, rows: Tensor) -> Tensor:
    """``head``'s outputs for the gathered ``rows``, with the values of ``gathered`` (the same rows picked out of
    the dense, gradient-free output: bit-identical to the reference's gather of a differentiable dense output)
    and the gradient of ``head(rows)``. Forward values are exact; gradients are the same sums over the live rows,
    possibly rounded in another order than the dense backward."""
    return _ValueWithGradientOf.apply(gathered, head(rows))


@dataclass
class DecoderQueries:
    """What a decoder's refinement layers start from (``QuerySelectionDecoder.prepare_queries``).

    memory [B, L, hidden_dim] (all levels flattened), spatial_shapes [[H, W] per level]; content [B, D + Q,
    hidden_dim] and boxes_unact [B, D + Q, 4] (logit space): the D denoising queries (none without denoising)
    before the Q selected ones; attn_mask [D + Q, D + Q] bool (True = blocked) or None; selected: the dict of
    ``_initial_queries``; denoising: the group used, or None.
    """

    memory: Tensor
    spatial_shapes: list[list[int]]
    content: Tensor
    boxes_unact: Tensor
    attn_mask: Tensor | None
    selected: dict
    denoising: DenoisingGroup | None


class QuerySelectionDecoder(nn.Module):
    """Base of the decoder heads: settings, query selection and denoising (see the module docstring).

    Subclasses call ``_init_settings`` first, build their input projection and layers, then
    ``_build_query_selection`` and ``_register_eval_anchors`` (the order fixes the state-dict key order,
    which must equal the reference's). Their ``forward`` starts with ``prepare_queries``.

    Constructor arguments both decoders take (names follow the reference YAML; each subclass spells out its
    signature, which the registry checks config keys against):
        num_classes: classes predicted (sigmoid/focal scores, no background class).
        hidden_dim: query and memory width.
        num_queries: queries selected from the encoder output.
        feat_channels, feat_strides: channels and strides of the encoder levels.
        num_levels: levels attended; extra levels are made by stride-2 convs on the last one.
        num_points: deformable sampling points per level (int or one per level).
        nhead, num_layers, dim_feedforward, dropout, activation: decoder layer settings.
        num_denoising, label_noise_ratio, box_noise_scale: contrastive denoising (0 disables it).
        learn_query_content: learned query content instead of the selected encoder features.
        eval_spatial_size: [H, W] whose anchors are cached for evaluation (other sizes are generated).
        eval_idx: layer whose output is the prediction (negative counts from the end).
        eps: anchors closer than eps to the image border are invalid.
        aux_loss: return the per-layer, encoder and denoising outputs in training.
        cross_attn_method: ``default`` (bilinear) or ``discrete`` sampling.
        query_select_method: ``default`` (best class), ``agnostic`` (one objectness score) or ``one2many``.

    ``forward(feats, targets=None, denoising=None)`` of both takes the encoder levels ``feats``
    [B, feat_channels[i], H_i, W_i], in training the ``targets`` (per image ``labels`` [N] and ``boxes`` [N, 4]
    cxcywh normalised) and optionally a prepared ``denoising`` group to use instead of drawing one (replaying a
    recorded batch); it returns at least ``pred_logits`` [B, Q, num_classes], ``pred_boxes`` [B, Q, 4] cxcywh
    normalised and ``enc_topk_ind`` [B, Q] (the position each query was selected from).
    """

    # How denoising handles a box edge pushed past its partner: D-FINE mirrors it, RT-DETRv2 does not.
    mirror_negative_sizes = True
    # D-FINE skips the projection of a level already hidden_dim wide; RT-DETRv2 always projects.
    skip_projection_at_hidden_dim = True

    def _init_settings(
        self, *, num_classes: int, hidden_dim: int, num_queries: int, feat_channels: Sequence[int],
        feat_strides: Sequence[int], num_levels: int, nhead: int, num_layers: int,
        eval_spatial_size: Sequence[int] | None, eval_idx: int, eps: float, aux_loss: bool,
        cross_attn_method: str, query_select_method: str, num_denoising: int, label_noise_ratio: float,
        box_noise_scale: float, learn_query_content: bool,
    ) -> list[int]:
        """Validate and store the settings both decoders share; returns feat_channels as a list."""
        feat_channels, feat_strides = list(feat_channels), list(feat_strides)
        if len(feat_channels) > num_levels or len(feat_strides) != len(feat_channels):
            raise ValueError(
                f"feat_channels {feat_channels} and feat_strides {feat_strides} must have the same length, "
                f"at most num_levels={num_levels}"
            )
        if query_select_method not in QUERY_SELECT_METHODS:
            raise ValueError(f"query_select_method `{query_select_method}` is not one of {QUERY_SELECT_METHODS}")
        if cross_attn_method not in SAMPLING_METHODS:
            raise ValueError(f"cross_attn_method `{cross_attn_method}` is not one of {SAMPLING_METHODS}")
        if not -num_layers <= eval_idx < num_layers:
            raise ValueError(f"eval_idx {eval_idx} is outside the {num_layers} decoder layers")
        while len(feat_strides) < num_levels:
            feat_strides.append(feat_strides[-1] * 2)

        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.feat_strides = feat_strides
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.eps = eps
        self.num_layers = num_layers
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        self.aux_loss = aux_loss
        self.cross_attn_method = cross_attn_method
        self.query_select_method = query_select_method
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.learn_query_content = learn_query_content
        return feat_channels

    def _build_input_proj(self, feat_channels: list[int]) -> nn.ModuleList:
        """1x1 conv + BN per level to hidden_dim, then stride-2 3x3 convs for the extra levels."""

        def conv_bn(c_in: int, kernel: int, stride: int) -> nn.Module:
            if c_in == self.hidden_dim and self.skip_projection_at_hidden_dim:
                return nn.Identity()
            conv = nn.Conv2d(c_in, self.hidden_dim, kernel, stride, padding=kernel // 2, bias=False)
            return nn.Sequential(OrderedDict([("conv", conv), ("norm", nn.BatchNorm2d(self.hidden_dim))]))

        projections = [conv_bn(c, 1, 1) for c in feat_channels]
        c_in = feat_channels[-1]
        for _ in range(self.num_levels - len(feat_channels)):
            projections.append(conv_bn(c_in, 3, 2))
            c_in = self.hidden_dim
        return nn.ModuleList(projections)

    def _build_query_selection(self, mlp_act: str = "relu") -> None:
        """Denoising label embedding, query content/position heads and the encoder output heads."""
        hidden_dim, num_classes = self.hidden_dim, self.num_classes
        if self.num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        if self.learn_query_content:
            self.tgt_embed = nn.Embedding(self.num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2, act=mlp_act)
        self.enc_output = nn.Sequential(
            OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)), ("norm", nn.LayerNorm(hidden_dim))])
        )
        agnostic = self.query_select_method == "agnostic"
        self.enc_score_head = nn.Linear(hidden_dim, 1 if agnostic else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)

    def _reset_head_parameters(self, box_heads: Iterable[nn.Module], projections: Iterable[nn.Module]) -> None:
        """Initialisation both references share: zero box heads start every box at its anchor / reference, class
        biases at a 1% prior, Xavier for the encoder output, query heads and the given input projections."""
        prior = bias_for_prior(0.01)
        nn.init.constant_(self.enc_score_head.bias, prior)
        for head in box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        for head in self.dec_score_head:
            nn.init.constant_(head.bias, prior)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        if self.learn_query_content:
            nn.init.xavier_uniform_(self.tgt_embed.weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for projection in projections:
            nn.init.xavier_uniform_(projection.conv.weight)

    def _register_eval_anchors(self) -> None:
        """Cache the anchors of ``eval_spatial_size`` as buffers (saved in checkpoints, like the reference's)."""
        self._anchor_shapes: list[list[int]] | None = None
        if self.eval_spatial_size:
            height, width = self.eval_spatial_size
            self._anchor_shapes = [[int(height / s), int(width / s)] for s in self.feat_strides]
            anchors, valid_mask = generate_anchors(self._anchor_shapes, eps=self.eps)
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid_mask)

    def _flatten_features(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[list[int]]]:
        """Project each level and flatten: -> memory [B, sum(H*W), C], spatial_shapes [[H, W], ...]."""
        projected = [proj(feat) for proj, feat in zip(self.input_proj, feats)]
        for i in range(len(feats), self.num_levels):
            projected.append(self.input_proj[i](feats[-1] if i == len(feats) else projected[-1]))
        # [B, H*W, C] per level: a view of a channels-last map (training), the same strided view of an NCHW one as
        # flatten(2).permute(0, 2, 1) (eval); flattening first would copy a channels-last map to NCHW order first.
        memory = torch.cat([f.permute(0, 2, 3, 1).flatten(1, 2) for f in projected], 1)
        return memory, [[f.shape[2], f.shape[3]] for f in projected]

    def _anchors_for(self, spatial_shapes: list[list[int]], device) -> tuple[Tensor, Tensor]:
        if not self.training and self._anchor_shapes == spatial_shapes:
            return self.anchors, self.valid_mask
        return generate_anchors(spatial_shapes, eps=self.eps, device=device)

    def _select_queries(self, logits: Tensor) -> Tensor:
        """[B, L, num_classes or 1] encoder logits -> [B, num_queries] indices of the chosen positions."""
        if logits.shape[1] < self.num_queries:
            raise ValueError(
                f"the feature maps have {logits.shape[1]} positions but num_queries={self.num_queries}: use larger "
                f"images (or eval_spatial_size) or fewer queries (model.decoder.num_queries)"
            )
        if self.query_select_method == "default":
            return torch.topk(logits.max(-1).values, self.num_queries, dim=-1).indices
        if self.query_select_method == "agnostic":
            return torch.topk(logits.squeeze(-1), self.num_queries, dim=-1).indices
        # one2many: the best (position, class) pairs; a position may be chosen more than once.
        return torch.topk(logits.flatten(1), self.num_queries, dim=-1).indices // self.num_classes

    @staticmethod
    def _gather(x: Tensor, index: Tensor) -> Tensor:
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def _initial_queries(self, memory: Tensor, spatial_shapes: list[list[int]]) -> dict:
        """Score every position, keep the top num_queries: their content, boxes (logit space) and, in training,
        the encoder's own predictions for them."""
        anchors, valid_mask = self._anchors_for(spatial_shapes, memory.device)
        mask = valid_mask.to(memory.dtype)
        # Every position is projected and scored, but only the num_queries selected ones reach a loss (D-FINE-S: 2 x
        # 300 of 2 x 8400 rows). So the dense pass runs without autograd, and the gradient goes through the same
        # layers applied to the selected rows alone (see scored_rows): the forward values are the dense pass's,
        # and no dense backward runs over rows whose gradient is zero.
        with torch.no_grad():
            enc_memory = self.enc_output(mask * memory)
            enc_logits = self.enc_score_head(enc_memory)
        topk_ind = self._select_queries(enc_logits)
        topk_memory = self._gather(enc_memory, topk_ind)
        if torch.is_grad_enabled():
            rows = self._gather(mask.expand(memory.shape[0], -1, -1), topk_ind) * self._gather(memory, topk_ind)
            topk_memory = scored_rows(topk_memory, self.enc_output, rows)
        topk_anchors = self._gather(anchors.expand(memory.shape[0], -1, -1), topk_ind)
        boxes_unact = self.enc_bbox_head(topk_memory) + topk_anchors
        if self.learn_query_content:
            content = self.tgt_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        else:
            content = topk_memory.detach()
        selected = {"content": content, "boxes_unact": boxes_unact.detach(), "topk_ind": topk_ind}
        if self.training:
            selected["enc_logits"] = scored_rows(self._gather(enc_logits, topk_ind), self.enc_score_head, topk_memory)
            selected["enc_boxes"] = torch.sigmoid(boxes_unact)
        return selected

    def prepare_queries(
        self, feats: Sequence[Tensor], targets: list[dict] | None = None, denoising: DenoisingGroup | None = None
    ) -> DecoderQueries:
        """The opening of both decoders' forward: flatten the levels, draw the denoising group (unless one is
        given), select the initial queries and put the denoising queries in front of them, with their mask."""
        memory, spatial_shapes = self._flatten_features(feats)
        if denoising is None:
            denoising = self.make_denoising_group(targets)
        selected = self._initial_queries(memory, spatial_shapes)
        content, boxes_unact = selected["content"], selected["boxes_unact"]
        attn_mask = None
        if denoising is not None:  # possibly zero queries (no targets), still joined for the DDP graph
            content = torch.cat([denoising.content, content], 1)
            boxes_unact = torch.cat([denoising.boxes_unact, boxes_unact], 1)
            attn_mask = denoising.attn_mask
        return DecoderQueries(memory, spatial_shapes, content, boxes_unact, attn_mask, selected, denoising)

    def make_denoising_group(self, targets: list[dict] | None) -> DenoisingGroup | None:
        if not (self.training and self.num_denoising > 0):
            return None
        if targets is None:
            raise ValueError(f"{type(self).__name__} needs `targets` in training mode for its denoising queries")
        return contrastive_denoising_group(
            targets, self.num_classes, self.num_queries, self.denoising_class_embed,
            num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio,
            box_noise_scale=self.box_noise_scale, mirror_negative_sizes=self.mirror_negative_sizes,
        )
