"""Check a COCO-format dataset before training: missing or corrupt images, bad boxes, category ids, num_classes.

Launcher for dfine/cli/check_dataset.py (also installed as the `dfine` command), kept so that `python tools/check_dataset.py` and
`torchrun tools/check_dataset.py` work from a source checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfine.cli.check_dataset import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
