"""Convert between our checkpoints and Hugging Face transformers model folders (D-FINE and RT-DETRv2).

Launcher for dfine/cli/convert.py (also installed as the `dfine` command), kept so that `python tools/convert.py` and
`torchrun tools/convert.py` work from a source checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfine.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
