"""Detect objects in an image, a folder of images or a video, with a checkpoint or an exported ONNX file.

Launcher for dfine/cli/infer.py (also installed as the `dfine` command), kept so that `python tools/infer.py` and
`torchrun tools/infer.py` work from a source checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfine.cli.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
