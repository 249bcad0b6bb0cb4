"""Registering modules are imported here explicitly."""
from dfine.models import detector  # noqa: F401  DFINE
from dfine.models import dfine_decoder  # noqa: F401  DFINETransformer
from dfine.models import postprocessor  # noqa: F401  DFINEPostProcessor
from dfine.models.backbones import hgnetv2  # noqa: F401  HGNetV2
from dfine.models import hybrid_encoder  # noqa: F401  HybridEncoder
from dfine.models.backbones import presnet  # noqa: F401  PResNet
from dfine.models import rtdetrv2_decoder  # noqa: F401  RTDETRTransformerv2
