"""The detector: backbone -> encoder -> decoder, joined in one module whose state-dict keys match the
reference's (``backbone.*``, ``encoder.*``, ``decoder.*``)."""

from __future__ import annotations

import torch
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
        # Training runs the convolutions channels-last (NHWC), the layout oneDNN (CPU) and cuDNN (GPU) prefer: on CPU
        # the NCHW backward of convolutions whose channel count is off the SIMD width (D-FINE-N's 21-channel CSP
        # blocks) is tens of times slower. The same products are summed, in another order. Eval stays NCHW: that
        # rounding difference moves D-FINE-N logits by up to 1.4e-4 against transformers' model, past the 1e-4 that
        # tests/test_hf_interop.py holds eval outputs to. Inference may opt in: deploy(channels_last=True).
        if self.training:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def deploy(self, channels_last: bool = False) -> "DFINE":
        """Switch to eval mode and let every submodule convert itself for inference (fuse conv + BN,
        merge re-parameterised branches, drop layers the eval output does not read). Irreversible.

        ``channels_last`` also stores the convolution weights NHWC, so that eval runs channels-last as training
        does (a convolution with NHWC weights reads and writes NHWC maps, whatever the input's layout):
        faster on a CPU (README, "Deployment": D-FINE-N x1.12-1.25, D-FINE-S x1.09-1.11 over the NCHW deploy form)
        and the same detections up to rounding (tests/test_deploy_mode.py), but no longer within the 1e-4 at which
        tests/test_hf_interop.py holds logits to transformers' model, so it is not the default here (infer.py and
        ``Predictor`` turn it on for the CPU).
        """
        self.eval()
        # Collected first: conversions replace children, and the old ones need no conversion.
        for module in list(self.modules()):
            convert = getattr(module, "convert_to_deploy", None)
            if callable(convert) and module is not self:
                convert()
        if channels_last:
            # NHWC weights: D-FINE-N x1.16 over NCHW deploy, where NHWC images alone gave x1.11 (same run); converting
            # the images as well changed neither the outputs (bit for bit) nor the time
            self.to(memory_format=torch.channels_last)
        return self
