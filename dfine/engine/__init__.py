"""Training and evaluation engine. Registering modules are imported here explicitly."""

from dfine.engine import ema, optim  # noqa: F401  (register ModelEMA; AdamW/SGD/Adam, LinearWarmup, MultiStepLR, FlatCosineLR)
