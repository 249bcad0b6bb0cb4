"""Training objectives. Registering modules are imported here explicitly.

    matcher.py     HungarianMatcher, GO-LSD union of assignments, denoising assignment
    criterion.py   DFINECriterion: which predictions each loss sees, with which targets and normaliser
    functional.py  the losses as pure functions (VFL, L1, GIoU, FGL, DDF)
"""

from dfine.losses import criterion, matcher  # noqa: F401  (register DFINECriterion, HungarianMatcher)
