"""Evaluate a checkpoint on its validation set: the 12 COCO numbers, a per-class AP table and a metrics JSON.

Launcher for dfine/cli/eval.py (also installed as the `dfine` command), kept so that `python tools/eval.py` and
`torchrun tools/eval.py` work from a source checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfine.cli.eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
