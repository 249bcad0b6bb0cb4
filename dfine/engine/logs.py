"""Logging set-up: rank 0 logs INFO to the console and to ``output_dir/train.log``; other ranks only warnings."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def setup_logging(output_dir: str | Path | None, rank: int, filename: str = "train.log") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_dfine", False):
            root.removeHandler(handler)
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / filename, encoding="utf-8"))
    for handler in handlers:
        handler._dfine = True  # ours to replace on the next call
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler.setLevel(level)
        root.addHandler(handler)
    root.setLevel(level)
