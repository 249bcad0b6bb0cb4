"""The RT-DETRv2 decoder (arXiv 2407.17140): query selection from encoder features, then a stack of layers that
each refine the boxes of the previous one (iterative box refinement, as in Deformable DETR).

Flow for a batch of multi-level features::

    feats -> input projection (1x1 conv + BN per level) -> flattened memory [B, L, C] + one anchor per position
          -> encoder head scores every position; the top ``num_queries`` become the queries, their encoder boxes
             the first references
          -> per layer: self-attention, deformable cross-attention around the reference box (a distinct number
             of sampling points per level, ``default`` bilinear or ``discrete`` sampling), feed-forward;
             the box head predicts a correction in logit space, and the corrected box is the next reference.

Its differences from D-FINE, which grew out of it: no FDR/LQE (boxes are direct logit-space offsets), plain
residual + LayerNorm instead of D-FINE's gate, and each cross-attention projects its own values. The encoder
side (input projection, anchors, top-k selection, encoder heads) and contrastive denoising are the very same as
D-FINE's: both decoders inherit them from dfine/models/query_selection.py.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from dfine.layers.deformable_attention import MSDeformableAttention
from dfine.layers.mlp import MLP, mlp_activation
from dfine.models.denoising import DenoisingGroup
from dfine.models.query_selection import QuerySelectionDecoder
from dfine.ops.boxes import inverse_sigmoid
from dfine.registry import DECODERS


class TransformerDecoderLayer(nn.Module):
    """Post-norm layer: self-attention, deformable cross-attention (with value/output projections), feed-forward;
    each followed by a residual sum and LayerNorm (``norm1``, ``norm2``, ``norm3``)."""

    def __init__(
        self,
        d_model: int = 256,
        n_head: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        n_levels: int = 4,
        n_points: int | Sequence[int] = 4,
        cross_attn_method: str = "default",
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(
            d_model, n_head, n_levels, n_points, method=cross_attn_method, value_proj=True
        )
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = mlp_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        target: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[Sequence[int]],
        attn_mask: Tensor | None = None,
        query_pos_embed: Tensor | None = None,
    ) -> Tensor:
        """target [B, Q, C], reference_points [B, Q, 1, 4] cxcywh in [0, 1], memory [B, L, C] -> [B, Q, C]."""
        q = k = target if query_pos_embed is None else target + query_pos_embed
        # need_weights=False lets PyTorch use its fused attention kernel.
        attended, _ = self.self_attn(q, k, value=target, attn_mask=attn_mask, need_weights=False)
        target = self.norm1(target + self.dropout1(attended))

        query = target if query_pos_embed is None else target + query_pos_embed
        sampled = self.cross_attn(query, reference_points, memory, spatial_shapes)
        target = self.norm2(target + self.dropout2(sampled))

        ffn = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        return self.norm3(target + self.dropout4(ffn))


class TransformerDecoder(nn.Module):
    """The layer stack (keys ``layers.{i}``); the heads live in RTDETRTransformerv2 and are passed to forward."""

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int, eval_idx: int = -1):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx

    def forward(
        self,
        target: Tensor,
        ref_points_unact: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[Sequence[int]],
        bbox_head: nn.ModuleList,
        score_head: nn.ModuleList,
        query_pos_head: nn.Module,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the layers.

        Args:
            target: [B, Q, C] query content; ref_points_unact: [B, Q, 4] initial boxes in logit space.
            memory: [B, L, C] flattened features.
        Returns:
            boxes [n, B, Q, 4] cxcywh and logits [n, B, Q, num_classes]: every layer in training, only eval_idx
            otherwise.
        """
        output = target
        reference = torch.sigmoid(ref_points_unact)  # no gradient: it only says where to look
        previous_box = reference
        boxes_per_layer, logits_per_layer = [], []
        for i, layer in enumerate(self.layers):
            query_pos_embed = query_pos_head(reference)
            output = layer(output, reference.unsqueeze(2), memory, spatial_shapes, attn_mask, query_pos_embed)
            delta = bbox_head[i](output)
            box = torch.sigmoid(delta + inverse_sigmoid(reference))
            if self.training:
                # "Look forward twice" (DINO): the supervised box refines the previous layer's box with its
                # gradient, so each loss also trains the box head one layer back (and no further: that box was
                # itself computed from a detached reference). Same value as `box`, a different graph.
                boxes_per_layer.append(torch.sigmoid(delta + inverse_sigmoid(previous_box)))
                logits_per_layer.append(score_head[i](output))
            elif i == self.eval_idx:
                boxes_per_layer.append(box)
                logits_per_layer.append(score_head[i](output))
                break
            previous_box = box
            reference = box.detach()
        return torch.stack(boxes_per_layer), torch.stack(logits_per_layer)


@DECODERS.register
class RTDETRTransformerv2(QuerySelectionDecoder):
    """RT-DETRv2 decoder head: query selection, refinement layers, class/box heads, contrastive denoising.

    Args: exactly those of ``QuerySelectionDecoder`` (documented there, shared with D-FINE).
    """

    mirror_negative_sizes = False  # the reference RT-DETRv2 clamps, it does not mirror
    skip_projection_at_hidden_dim = False

    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: Sequence[int] = (512, 1024, 2048),
        feat_strides: Sequence[int] = (8, 16, 32),
        num_levels: int = 3,
        num_points: int | Sequence[int] = 4,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        learn_query_content: bool = False,
        eval_spatial_size: Sequence[int] | None = None,
        eval_idx: int = -1,
        eps: float = 1e-2,
        aux_loss: bool = True,
        cross_attn_method: str = "default",
        query_select_method: str = "default",
    ):
        super().__init__()
        feat_channels = self._init_settings(
            num_classes=num_classes, hidden_dim=hidden_dim, num_queries=num_queries, feat_channels=feat_channels,
            feat_strides=feat_strides, num_levels=num_levels, nhead=nhead, num_layers=num_layers,
            eval_spatial_size=eval_spatial_size, eval_idx=eval_idx, eps=eps, aux_loss=aux_loss,
            cross_attn_method=cross_attn_method, query_select_method=query_select_method,
            num_denoising=num_denoising, label_noise_ratio=label_noise_ratio, box_noise_scale=box_noise_scale,
            learn_query_content=learn_query_content,
        )

        self.input_proj = self._build_input_proj(feat_channels)
        layer = TransformerDecoderLayer(
            hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_points, cross_attn_method
        )
        self.decoder = TransformerDecoder(layer, num_layers, eval_idx)

        self._build_query_selection()
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers))

        self._register_eval_anchors()
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        self._reset_head_parameters((self.enc_bbox_head, *self.dec_bbox_head), self.input_proj)

    def forward(
        self, feats: Sequence[Tensor], targets: list[dict] | None = None, denoising: DenoisingGroup | None = None
    ) -> dict:
        """Arguments and common outputs: see ``QuerySelectionDecoder``. In training with aux_loss also ``aux_outputs``
        (the earlier layers), ``enc_aux_outputs`` (the encoder's boxes for the selected queries),
        ``enc_meta`` and, with denoising, ``dn_aux_outputs`` (every layer) and ``dn_meta``.
        """
        q = self.prepare_queries(feats, targets, denoising)
        selected, denoising = q.selected, q.denoising
        boxes, logits = self.decoder(
            q.content, q.boxes_unact, q.memory, q.spatial_shapes, self.dec_bbox_head, self.dec_score_head,
            self.query_pos_head, attn_mask=q.attn_mask,
        )
        if denoising is not None:
            split = denoising.meta["dn_num_split"]
            dn_boxes, boxes = boxes.split(split, dim=2)
            dn_logits, logits = logits.split(split, dim=2)

        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "enc_topk_ind": selected["topk_ind"]}
        if self.training and self.aux_loss:
            out["aux_outputs"] = _layer_outputs(logits[:-1], boxes[:-1])
            out["enc_aux_outputs"] = [{"pred_logits": selected["enc_logits"], "pred_boxes": selected["enc_boxes"]}]
            out["enc_meta"] = {"class_agnostic": self.query_select_method == "agnostic"}
            if denoising is not None:
                out["dn_aux_outputs"] = _layer_outputs(dn_logits, dn_boxes)
                out["dn_meta"] = denoising.meta
        return out


def _layer_outputs(logits: Tensor, boxes: Tensor) -> list[dict]:
    """[n, B, Q, C] logits and [n, B, Q, 4] boxes -> one {"pred_logits", "pred_boxes"} dict per layer."""
    return [{"pred_logits": layer_logits, "pred_boxes": layer_boxes} for layer_logits, layer_boxes in zip(logits, boxes)]
