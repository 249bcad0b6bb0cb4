"""Registering modules are imported here explicitly."""

from dfine.losses import criterion, matcher  # noqa: F401  (register DFINECriterion, HungarianMatcher)
