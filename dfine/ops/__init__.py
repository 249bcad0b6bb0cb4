"""Tensor operations without parameters.

    boxes.py  box format conversions (cxcywh, xyxy, xywh), IoU / GIoU (pairwise, broadcasting, and elementwise),
              inverse sigmoid: the single copy used by models, losses, evaluation and deploy
"""
