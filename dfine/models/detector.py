"""The detector: backbone -> encoder -> decoder, joined in one module whose state-dict keys match the
reference's (``backbone.*``, ``encoder.*``, ``decoder.*``)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from dfine.registry import DETECTORS


@DETECTORS.register
class DFINE(nn.Module):
    """A DETR-style detector built from three parts; D-FINE and RT-DETRv2 differ only in their parts.

    Args:
        backbone: images [B, 3, H, W] -> list of feature maps.
        encoder: feature maps -> list of fused feature maps.
        decoder: fused maps (and targets in training) -> outputs dict.
    """

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        # Registration order fixes the state-dict order; the reference's is backbone, decoder, encoder.
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder

    def forward(self, images: Tensor, targets: list[dict] | None = None) -> dict:
        """
        Args:
            images: [B, 3, H, W] float in [0, 1].
            targets: per image ``labels`` [N] and ``boxes`` [N, 4] (cxcywh, normalised); used in training
                for the denoising queries.
        Returns:
            the decoder's outputs dict (``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4], ...).
        """
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def deploy(self) -> "DFINE":
        """Switch to eval mode and let every submodule convert itself for inference (fuse conv + BN,
        merge re-parameterised branches, drop layers the eval output does not read). Irreversible."""
        self.eval()
        # Collected first: conversions replace children, and the old ones need no conversion.
        for module in list(self.modules()):
            convert = getattr(module, "convert_to_deploy", None)
            if callable(convert) and module is not self:
                convert()
        return self
