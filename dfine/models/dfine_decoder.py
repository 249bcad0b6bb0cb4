"""The D-FINE decoder (arXiv 2410.13842): query selection from encoder features, then a stack of
deformable-attention layers that refine boxes by Fine-grained Distribution Refinement (FDR).

Flow for a batch of multi-level features::

    feats -> input projection -> flattened memory [B, L, C] + anchors per position
          -> encoder head scores every position; the top ``num_queries`` become the queries
          -> layer 0 predicts a first box (pre_bbox_head) that every later layer refines:
             each layer adds to four edge distributions over reg_max + 1 bins (pred_corners), decoded by the
             weighting function W (dfine/models/fdr.py) into edge offsets around that first box
          -> class scores + LQE (Localization Quality Estimation: a small MLP on the sharpness of the edge
             distributions, added to the class logits).

The encoder side (projection, anchors, query selection, denoising group) lives in
dfine/models/query_selection.py, shared with RT-DETRv2. In training, contrastive denoising queries
(dfine/models/denoising.py) run beside the selected ones and every layer's outputs are returned for the deep
supervision and GO-LSD distillation of the criterion.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dfine.layers.deformable_attention import MSDeformableAttention, split_value_levels
from dfine.layers.mlp import MLP, mlp_activation
from dfine.models.denoising import DenoisingGroup
from dfine.models.fdr import distance2bbox, weighting_function
from dfine.models.query_selection import QuerySelectionDecoder, bias_for_prior
from dfine.ops.boxes import inverse_sigmoid
from dfine.registry import DECODERS


def integral(pred_corners: Tensor, project: Tensor) -> Tensor:
    """Expected edge offsets of four per-edge distributions.

    Args:
        pred_corners: [..., 4 * (reg_max + 1)] logits, edge-major (left, top, right, bottom).
        project: [reg_max + 1] bin values W(n).
    Returns:
        [..., 4] offsets in W's units.
    """
    probs = pred_corners.reshape(*pred_corners.shape[:-1], 4, project.shape[0]).softmax(-1)
    return probs @ project.to(probs.dtype)


class Gate(nn.Module):
    """Gated fusion of the self-attended query and the cross-attention result (replaces a residual sum)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gate = nn.Linear(2 * d_model, 2 * d_model)
        nn.init.constant_(self.gate.bias, bias_for_prior(0.5))
        nn.init.zeros_(self.gate.weight)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        """[B, Q, C] x 2 -> [B, Q, C]."""
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x1, x2], -1))).chunk(2, -1)
        return self.norm(g1 * x1 + g2 * x2)


class LQE(nn.Module):
    """Localization Quality Estimation: adds a score from the top-k probabilities of each edge distribution
    (sharp distributions mean a well-localised box) to the class logits."""

    def __init__(self, k: int, hidden_dim: int, num_layers: int, reg_max: int, act: str = "relu"):
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, num_layers, act=act)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, scores: Tensor, pred_corners: Tensor) -> Tensor:
        """scores [B, Q, num_classes], pred_corners [B, Q, 4 * (reg_max + 1)] -> [B, Q, num_classes]."""
        batch, queries, _ = pred_corners.shape
        probs = pred_corners.reshape(batch, queries, 4, self.reg_max + 1).softmax(-1)
        top, _ = probs.topk(self.k, dim=-1)
        stats = torch.cat([top, top.mean(-1, keepdim=True)], -1).reshape(batch, queries, -1)
        return scores + self.reg_conf(stats)


class TransformerDecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention fused by a Gate, then a feed-forward block.

    With ``layer_scale`` the layer is that many times wider (for the auxiliary layers after eval_idx).
    """

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
        layer_scale: float | None = None,
    ):
        super().__init__()
        if layer_scale is not None:
            dim_feedforward = round(layer_scale * dim_feedforward)
            d_model = round(layer_scale * d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points, method=cross_attn_method)
        self.dropout2 = nn.Dropout(dropout)
        self.gateway = Gate(d_model)
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
        value: list[Tensor],
        spatial_shapes: Sequence[Sequence[int]],
        attn_mask: Tensor | None = None,
        query_pos_embed: Tensor | None = None,
    ) -> Tensor:
        """target [B, Q, C], reference_points [B, Q, 1, 4], value per-level maps -> [B, Q, C]."""
        q = k = target if query_pos_embed is None else target + query_pos_embed
        # need_weights=False lets PyTorch use its fused attention kernel.
        attended, _ = self.self_attn(q, k, value=target, attn_mask=attn_mask, need_weights=False)
        target = self.norm1(target + self.dropout1(attended))

        query = target if query_pos_embed is None else target + query_pos_embed
        sampled = self.cross_attn(query, reference_points, value, spatial_shapes)
        target = self.gateway(target, self.dropout2(sampled))

        ffn = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        # The clamp keeps float16 activations finite (65504 is its largest value).
        return self.norm3((target + self.dropout4(ffn)).clamp(min=-65504, max=65504))


class TransformerDecoder(nn.Module):
    """The layer stack with its LQE heads. The prediction heads live in DFINETransformer (their state-dict
    keys are ``decoder.dec_*``) and are passed to forward.

    ``up`` and ``reg_scale`` are the parent's parameters, registered here too, so both key sets of the
    reference checkpoints (``decoder.up`` and ``decoder.decoder.up``) exist.
    """

    def __init__(
        self,
        hidden_dim: int,
        decoder_layer: TransformerDecoderLayer,
        decoder_layer_wide: TransformerDecoderLayer,
        num_layers: int,
        num_head: int,
        reg_max: int,
        reg_scale: nn.Parameter,
        up: nn.Parameter,
        eval_idx: int = -1,
        layer_scale: float = 2,
        act: str = "relu",
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.layer_scale = layer_scale
        self.num_head = num_head
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        self.up, self.reg_scale, self.reg_max = up, reg_scale, reg_max
        self.layers = nn.ModuleList(
            [copy.deepcopy(decoder_layer) for _ in range(self.eval_idx + 1)]
            + [copy.deepcopy(decoder_layer_wide) for _ in range(num_layers - self.eval_idx - 1)]
        )
        self.lqe_layers = nn.ModuleList([LQE(4, 64, 2, reg_max, act=act) for _ in range(num_layers)])
        # W(n), frozen by convert_to_deploy; a buffer so that .to(device/dtype) moves it, non-persistent so
        # that checkpoints keep the reference's keys.
        self.register_buffer("project", None, persistent=False)

    def convert_to_deploy(self) -> None:
        """Keep only what the eval_idx output needs and freeze the bin values."""
        with torch.no_grad():
            self.project = weighting_function(self.reg_max, self.up, self.reg_scale).detach().clone()
        self.layers = self.layers[: self.eval_idx + 1]
        self.lqe_layers = nn.ModuleList([nn.Identity()] * self.eval_idx + [self.lqe_layers[self.eval_idx]])

    def _values(self, memory: Tensor, spatial_shapes, width: int | None = None) -> list[Tensor]:
        if width is not None:  # wide layers read a memory stretched to their width
            memory = F.interpolate(memory, size=width)
        return split_value_levels(memory, spatial_shapes, self.num_head)

    def forward(
        self,
        target: Tensor,
        ref_points_unact: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[Sequence[int]],
        bbox_head: nn.ModuleList,
        score_head: nn.ModuleList,
        query_pos_head: nn.Module,
        pre_bbox_head: nn.Module,
        attn_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Run the layers.

        Args:
            target: [B, Q, C] query content; ref_points_unact: [B, Q, 4] initial boxes in logit space.
            memory: [B, L, C] flattened features.
        Returns:
            ``boxes``, ``logits``, ``corners``, ``refs``: stacked per returned layer ([n, B, Q, ...]; every
            layer in training, only eval_idx otherwise); ``pre_boxes`` [B, Q, 4] from layer 0 and, in
            training, ``pre_logits``.
        """
        project = self.project if self.project is not None else weighting_function(self.reg_max, self.up, self.reg_scale)
        value = self._values(memory, spatial_shapes)
        output = target
        previous_output: Tensor | float = 0.0  # detached output of the previous layer
        previous_corners: Tensor | float = 0.0  # corners accumulate over layers (residual distributions)
        ref_points = torch.sigmoid(ref_points_unact)
        collected: dict[str, list[Tensor]] = {"boxes": [], "logits": [], "corners": [], "refs": []}
        result: dict[str, Tensor] = {}

        for i, layer in enumerate(self.layers):
            query_pos_embed = query_pos_head(ref_points).clamp(min=-10, max=10)
            if i > self.eval_idx and self.layer_scale > 1:
                query_pos_embed = F.interpolate(query_pos_embed, scale_factor=self.layer_scale)
                value = self._values(memory, spatial_shapes, query_pos_embed.shape[-1])
                output = F.interpolate(output, size=query_pos_embed.shape[-1])
                previous_output = output.detach()

            output = layer(output, ref_points.unsqueeze(2), value, spatial_shapes, attn_mask, query_pos_embed)

            if i == 0:
                # The first box; every later layer's edges are measured from it.
                pre_boxes = torch.sigmoid(pre_bbox_head(output) + inverse_sigmoid(ref_points))
                result["pre_boxes"] = pre_boxes
                if self.training:
                    result["pre_logits"] = score_head[0](output)
                initial_boxes = pre_boxes.detach()

            corners = bbox_head[i](output + previous_output) + previous_corners
            boxes = distance2bbox(initial_boxes, integral(corners, project), self.reg_scale)

            if self.training or i == self.eval_idx:
                logits = self.lqe_layers[i](score_head[i](output), corners)
                for key, item in zip(collected, (boxes, logits, corners, initial_boxes)):
                    collected[key].append(item)
                if not self.training:
                    break

            previous_corners = corners
            ref_points = boxes.detach()
            previous_output = output.detach()

        result.update({key: torch.stack(items) for key, items in collected.items()})
        return result


@DECODERS.register
class DFINETransformer(QuerySelectionDecoder):
    """D-FINE decoder head: query selection, refinement layers, class/box/FDR heads, denoising.

    Args: those of ``QuerySelectionDecoder`` (documented there, shared with RT-DETRv2), and
        reg_max: FDR bins per edge minus one; reg_scale: curvature of the weighting function W.
        layer_scale: width multiplier of the layers after eval_idx.
        mlp_act: activation of the MLP heads.
    """

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
        reg_max: int = 32,
        reg_scale: float = 4.0,
        layer_scale: float = 1,
        mlp_act: str = "relu",
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
        self.reg_max = reg_max
        scaled_dim = round(layer_scale * hidden_dim)

        self.input_proj = self._build_input_proj(feat_channels)

        # Fixed FDR constants, stored as parameters without gradient like the reference (reg_scale keeps
        # the YAML's type: an int in the released configs).
        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([reg_scale]), requires_grad=False)
        layer = TransformerDecoderLayer(
            hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_points, cross_attn_method
        )
        wide_layer = TransformerDecoderLayer(
            hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_points, cross_attn_method,
            layer_scale=layer_scale,
        )
        self.decoder = TransformerDecoder(
            hidden_dim, layer, wide_layer, num_layers, nhead, reg_max, self.reg_scale, self.up, eval_idx,
            layer_scale, act=activation,
        )

        self._build_query_selection(mlp_act)

        num_narrow, num_wide = self.eval_idx + 1, num_layers - self.eval_idx - 1
        self.dec_score_head = nn.ModuleList(
            [nn.Linear(hidden_dim, num_classes) for _ in range(num_narrow)]
            + [nn.Linear(scaled_dim, num_classes) for _ in range(num_wide)]
        )
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        corner_dim = 4 * (reg_max + 1)
        self.dec_bbox_head = nn.ModuleList(
            [MLP(hidden_dim, hidden_dim, corner_dim, 3, act=mlp_act) for _ in range(num_narrow)]
            + [MLP(scaled_dim, scaled_dim, corner_dim, 3, act=mlp_act) for _ in range(num_wide)]
        )

        self._register_eval_anchors()
        self._reset_parameters(feat_channels)

    def _reset_parameters(self, feat_channels: list[int]) -> None:
        # the reference initialises only the projections of the backbone levels that are not already hidden_dim
        projections = [p for p, c in zip(self.input_proj, feat_channels) if c != self.hidden_dim]
        self._reset_head_parameters((self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head), projections)

    def convert_to_deploy(self) -> None:
        """Drop the class heads that inference never reads (DFINE.deploy calls this)."""
        self.dec_score_head = nn.ModuleList(
            [nn.Identity()] * self.eval_idx + [self.dec_score_head[self.eval_idx]]
        )

    # -- forward -------------------------------------------------------------------------------------

    def forward(
        self, feats: Sequence[Tensor], targets: list[dict] | None = None, denoising: DenoisingGroup | None = None
    ) -> dict:
        """Arguments and common outputs: see ``QuerySelectionDecoder``. In training also ``pred_corners``
        [B, Q, 4 * (reg_max + 1)], ``ref_points`` [B, Q, 4], ``up``, ``reg_scale`` and, with aux_loss,
        ``aux_outputs`` (earlier layers, with ``teacher_corners``/``teacher_logits`` of the last),
        ``pre_outputs`` (layer 0's first boxes), ``enc_aux_outputs``, ``enc_meta`` and, with denoising,
        ``dn_outputs``, ``dn_pre_outputs``, ``dn_meta``.
        """
        q = self.prepare_queries(feats, targets, denoising)
        selected, denoising = q.selected, q.denoising
        decoded = self.decoder(
            q.content, q.boxes_unact, q.memory, q.spatial_shapes, self.dec_bbox_head, self.dec_score_head,
            self.query_pos_head, self.pre_bbox_head, attn_mask=q.attn_mask,
        )
        if not self.training:
            return {
                "pred_logits": decoded["logits"][-1],
                "pred_boxes": decoded["boxes"][-1],
                "enc_topk_ind": selected["topk_ind"],
            }
        return self._training_outputs(decoded, selected, denoising)

    def _training_outputs(self, decoded: dict, selected: dict, denoising: DenoisingGroup | None) -> dict:
        """Split denoising queries off and arrange everything the criterion reads, keyed like the reference."""
        dn = {}
        if denoising is not None:
            split = denoising.meta["dn_num_split"]
            for key in ("pre_logits", "pre_boxes"):
                dn[key], decoded[key] = decoded[key].split(split, dim=1)
            for key in ("boxes", "logits", "corners", "refs"):
                dn[key], decoded[key] = decoded[key].split(split, dim=2)

        logits, boxes, corners, refs = (decoded[k] for k in ("logits", "boxes", "corners", "refs"))
        out = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "pred_corners": corners[-1],
            "ref_points": refs[-1],
            "up": self.up,
            "reg_scale": self.reg_scale,
            "enc_topk_ind": selected["topk_ind"],
        }
        if not self.aux_loss:
            return out
        out["aux_outputs"] = _layer_outputs(logits[:-1], boxes[:-1], corners[:-1], refs[:-1], corners[-1], logits[-1])
        out["enc_aux_outputs"] = [{"pred_logits": selected["enc_logits"], "pred_boxes": selected["enc_boxes"]}]
        out["pre_outputs"] = {"pred_logits": decoded["pre_logits"], "pred_boxes": decoded["pre_boxes"]}
        out["enc_meta"] = {"class_agnostic": self.query_select_method == "agnostic"}
        if denoising is not None:
            out["dn_outputs"] = _layer_outputs(
                dn["logits"], dn["boxes"], dn["corners"], dn["refs"], dn["corners"][-1], dn["logits"][-1]
            )
            out["dn_pre_outputs"] = {"pred_logits": dn["pre_logits"], "pred_boxes": dn["pre_boxes"]}
            out["dn_meta"] = denoising.meta
        return out


def _layer_outputs(logits, boxes, corners, refs, teacher_corners, teacher_logits) -> list[dict]:
    """One dict per layer; the last layer's corners and logits are the GO-LSD teacher of each."""
    return [
        {
            "pred_logits": layer_logits,
            "pred_boxes": layer_boxes,
            "pred_corners": layer_corners,
            "ref_points": layer_refs,
            "teacher_corners": teacher_corners,
            "teacher_logits": teacher_logits,
        }
        for layer_logits, layer_boxes, layer_corners, layer_refs in zip(logits, boxes, corners, refs)
    ]
