"""Time the train step, the eval forward or the data pipeline (protocol: ../shared/DESIGN.md, performance note).

Launcher for dfine/cli/benchmark.py (also installed as the `dfine` command), kept so that `python tools/benchmark.py` and
`torchrun tools/benchmark.py` work from a source checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfine.cli.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
