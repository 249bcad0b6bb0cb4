"""The ``dfine`` command: one entry point for every program of dfine/cli.

    dfine train -c configs/dfine_n_demo.yml
    dfine eval -r output/dfine_n_demo/best.pth
    torchrun --nproc_per_node=8 $(which dfine) train -c configs/dfine_x_coco.yml
    torchrun --nproc_per_node=8 -m dfine.cli train -c configs/dfine_x_coco.yml

Installed by ``pip install`` (setup.py ``entry_points``); ``python -m dfine.cli`` is the same program.
Each command is the matching tools/*.py; ``dfine COMMAND --help`` shows its options.
"""

from __future__ import annotations

import importlib
import sys

PROG = "dfine"

# command -> (module of dfine.cli with a main(argv) -> exit code, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a detector from a config (also --test-only evaluation; -r auto resumes)"),
    "eval": ("eval", "evaluate a checkpoint: the 12 COCO numbers and a per-class AP table"),
    "predict": ("infer", "detect objects in images, a folder or a video (checkpoint or ONNX)"),
    "export": ("export_onnx", "export to ONNX and check the file reproduces PyTorch"),
    "convert": ("convert", "convert between our checkpoints and Hugging Face model folders"),
    "check-data": ("check_dataset", "check a dataset before training (COCO json, or --data in any layout)"),
    "benchmark": ("benchmark", "time the train step, the eval forward or the data pipeline"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} COMMAND [args]   ({PROG} COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "Distributed training: torchrun --nproc_per_node=N $(which dfine) train ... (or torchrun -m dfine.cli train ...)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from dfine import __version__

        print(f"{PROG} {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from dfine.registry import did_you_mean  # only on this path: importing dfine loads torch

        print(f"error: unknown command `{name}`{did_you_mean(name, COMMANDS, n=1)}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"dfine.cli.{COMMANDS[name][0]}")
    # argparse names the program after sys.argv[0]: usage lines then read `dfine train ...`
    sys.argv = [f"{PROG} {name}", *rest]
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
