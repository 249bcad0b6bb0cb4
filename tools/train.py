"""Train or evaluate a detector from a config.

Launcher for dfine/cli/train.py (also installed as the `dfine` command), kept so that `python tools/train.py` and
`torchrun tools/train.py` work from a source checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfine.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
