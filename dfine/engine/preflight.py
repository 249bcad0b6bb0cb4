"""The dataset pre-flight check run before training: fatal problems stop the job before any model is built."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def run_preflight(cfg: dict, test_only: bool) -> bool:
    """True when training may start. Uses the data package's checks (dfine/data/checks.py) on every
    dataloader section in use; their warnings are logged, their errors logged and fatal."""
    try:
        from dfine.data import checks
    except ImportError:
        logger.warning("dataset pre-flight check unavailable (dfine.data.checks is missing); skipping it")
        return True
    check = getattr(checks, "check_dataloader_config", None)
    if check is None:
        logger.warning("dfine.data.checks has no check_dataloader_config(cfg, split); pre-flight check skipped")
        return True
    ok = True
    for split in ("val",) if test_only else ("train", "val"):
        report = check(cfg, split)
        for line in getattr(report, "warnings", []):
            logger.warning("%s data: %s", split, line)
        for line in getattr(report, "errors", []):
            logger.error("%s data: %s", split, line)
            ok = False
    if not ok:
        logger.error("the dataset pre-flight check found fatal problems (above); fix them and restart")
    return ok
