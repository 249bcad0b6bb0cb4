"""``tools/train.py`` for the fault tests (no ``test_`` prefix: pytest does not collect it): the same ``main``,
with a fault injected at the start of optimizer step ``DFINE_TEST_FAULT_STEP`` (counted from 1 in this process,
before its forward pass):

* ``DFINE_TEST_FAULT=sigkill``: rank ``DFINE_TEST_FAULT_RANK`` SIGKILLs itself, only in the first attempt of a
  torchrun elastic run (TORCHELASTIC_RESTART_COUNT 0), so the restarted workers train on.
* ``DFINE_TEST_FAULT=sigterm``: this process sends itself SIGTERM (the pre-emption path).
"""

from __future__ import annotations

import os
import signal
import sys


def install_fault() -> None:
    import dfine.engine.loop as loop

    kind, at = os.environ.get("DFINE_TEST_FAULT"), int(os.environ.get("DFINE_TEST_FAULT_STEP", "0"))
    if kind == "sigkill" and (os.environ.get("RANK") != os.environ.get("DFINE_TEST_FAULT_RANK", "1")
                              or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return
    sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}.get(kind)
    if sig is None:
        return
    real, calls = loop.image_ids, [0]

    def with_fault(targets):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), sig)
        return real(targets)

    loop.image_ids = with_fault


if __name__ == "__main__":
    install_fault()
    from dfine.cli.train import main

    sys.exit(main(sys.argv[1:]))
