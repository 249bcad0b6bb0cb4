"""The detector and its parts. Registering modules are imported here explicitly.

    detector.py          DFINE: backbone -> encoder -> decoder
    backbones/           HGNetV2 (D-FINE), PResNet (RT-DETRv2), common.py (frozen BatchNorm, weights error)
    hybrid_encoder.py    HybridEncoder: AIFI on the coarsest map, then cross-scale fusion
    query_selection.py   the decoders' base: settings, input projection, query selection, denoising, forward opening
    dfine_decoder.py     DFINETransformer (FDR, LQE, GO-LSD outputs)
    rtdetrv2_decoder.py  RTDETRTransformerv2
    denoising.py         contrastive denoising queries
    fdr.py               Fine-grained Distribution Refinement math (shared with the losses)
    postprocessor.py     DFINEPostProcessor: top-k detections in pixels
"""
from dfine.models import detector  # noqa: F401  DFINE
from dfine.models import dfine_decoder  # noqa: F401  DFINETransformer
from dfine.models import postprocessor  # noqa: F401  DFINEPostProcessor
from dfine.models.backbones import hgnetv2  # noqa: F401  HGNetV2
from dfine.models import hybrid_encoder  # noqa: F401  HybridEncoder
from dfine.models.backbones import presnet  # noqa: F401  PResNet
from dfine.models import rtdetrv2_decoder  # noqa: F401  RTDETRTransformerv2
