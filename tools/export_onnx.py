"""Export a trained detector (model + postprocessor, deploy form) to ONNX, then prove the file reproduces PyTorch.

Launcher for dfine/cli/export_onnx.py (also installed as the `dfine` command), kept so that `python tools/export_onnx.py` and
`torchrun tools/export_onnx.py` work from a source checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfine.cli.export_onnx import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
