"""Helpers with no dependency on the rest of dfine, so that any package may use them without an upward arrow.

- ``distributed``: rank, world size and object gathering over torch.distributed (one process when not launched
  by torchrun); used by engine/ (training) and evaluation/ (gathering detections).
- ``drawing``: class colours and the one routine that draws a labelled box (inference outputs, evaluation
  reports, the demo picture).
- ``files``: ``atomic_write``, the one way a checkpoint, config, metrics file, results table or plot is written.
"""
