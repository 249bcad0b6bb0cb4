"""What every command-line program shares: "a user error becomes one line and exit status 2" (``run_tool``), and
checks of its arguments that run before any model, data or output is touched.

A user error is one of ``dfine.errors.USER_ERRORS`` (a config, path, dataset, checkpoint, device or argument the
user can fix); anything else is a bug and keeps its traceback. The checks never create or change anything on disk.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterable

USAGE_EXIT = 2


def report(err: BaseException) -> int:
    """Print ``error: <message>`` as one line on stderr; returns the exit status for a user error."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    return USAGE_EXIT


def run_tool(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a tool's ``main(argv) -> int``: user errors (dfine.errors.USER_ERRORS) become one line and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        from dfine.errors import USER_ERRORS

        try:
            return main(argv)
        except USER_ERRORS as err:
            return report(err)

    return wrapper


def usage_error(message: str) -> Exception:
    """A UsageError to raise from a tool: printed as one line, exit status 2."""
    from dfine.errors import UsageError

    return UsageError(message)



# ---- inputs


def input_file(value: str | os.PathLike | None, flag: str, suffixes: Iterable[str] = ()) -> Path | None:
    """An existing file (None passes: the argument was not given)."""
    if value is None:
        return None
    path = Path(value)
    if not path.exists():
        raise usage_error(f"{flag} {value}: no such file")
    if not path.is_file():
        raise usage_error(f"{flag} {value}: is a folder, not a file")
    suffixes = tuple(suffixes)
    if suffixes and path.suffix.lower() not in suffixes:
        raise usage_error(f"{flag} {value}: expected a {' or '.join(suffixes)} file")
    return path


def checkpoint_file(value: str | os.PathLike | None, flag: str) -> Path | None:
    """An existing file that looks like a torch.save checkpoint (a zip archive, or a legacy pickle), so a truncated
    download or a wrong file fails here instead of after data and model are built. Only the header is read."""
    path = input_file(value, flag)
    if path is None or path.suffix.lower() == ".onnx":
        return path
    with open(path, "rb") as f:
        first = f.read(1)
    if not zipfile.is_zipfile(path) and first != b"\x80":
        raise usage_error(f"{flag} {value}: not a PyTorch checkpoint (truncated download, or another kind of file?)")
    return path


def weights_file(value: str | os.PathLike | None, flag: str) -> Path | str | None:
    """A checkpoint file, or the name of a released model (dfine/weights.py; fetched later, when it is needed)."""
    from dfine.weights import WEIGHTS

    if value is not None and not os.path.exists(value) and str(value) in WEIGHTS:
        return str(value)
    return checkpoint_file(value, flag)


def config_file(value: str | os.PathLike | None, flag: str) -> Path | None:
    """A YAML config, or a checkpoint (.pth, .pt) that carries one."""
    if value is not None and Path(value).suffix.lower() in (".pth", ".pt"):
        return checkpoint_file(value, flag)
    return input_file(value, flag)


def input_dir(value: str | os.PathLike | None, flag: str) -> Path | None:
    """An existing folder (None passes)."""
    if value is None:
        return None
    path = Path(value)
    if not path.exists():
        raise usage_error(f"{flag} {value}: no such folder")
    if not path.is_dir():
        raise usage_error(f"{flag} {value}: is a file, not a folder")
    return path


def input_file_or_dir(value: str | os.PathLike, flag: str, suffixes: Iterable[str] = ()) -> Path:
    """An existing folder, or an existing file with one of ``suffixes``."""
    path = Path(value)
    if path.is_dir():
        return path
    if not path.exists():
        raise usage_error(f"{flag} {value}: no such file or folder")
    return input_file(path, flag, suffixes)


# ---- outputs


def _first_existing(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _creatable(folder: Path, flag: str, shown: str) -> None:
    """``folder`` exists as a writable folder, or can be made: its nearest existing ancestor is a writable folder."""
    probe = _first_existing(folder)
    if not probe.is_dir():
        raise usage_error(f"{flag} {shown}: cannot be created, {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise usage_error(f"{flag} {shown}: {probe} is not writable")


def output_dir(value: str | os.PathLike | None, flag: str) -> Path | None:
    """A folder that exists and is writable, or can be created (nothing is created here)."""
    if value is None:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise usage_error(f"{flag} {value}: is a file; give a folder")
    _creatable(path, flag, str(value))
    return path


def output_file(value: str | os.PathLike | None, flag: str) -> Path | None:
    """A file path whose folder exists or can be created, and that is not a folder itself."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise usage_error(f"{flag} {value}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise usage_error(f"{flag} {value}: exists and is not writable")
    _creatable(path.parent, flag, str(value))
    return path


# ---- numbers


def fraction(value: float | None, flag: str) -> float | None:
    """A value in [0, 1] (a score threshold, an IoU)."""
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise usage_error(f"{flag} {value}: expected a value in [0, 1]")
    return value


def at_least(value: int | float | None, flag: str, low: int | float) -> int | float | None:
    if value is not None and (not math.isfinite(value) or value < low):
        raise usage_error(f"{flag} {value}: expected a number >= {low}")
    return value


def in_range(value: int | None, flag: str, low: int, high: int) -> int | None:
    if value is not None and not low <= value <= high:
        raise usage_error(f"{flag} {value}: expected an integer in [{low}, {high}]")
    return value


def image_size(values: Iterable[int] | None, flag: str, multiple: int = 32) -> list[int] | None:
    """Positive sizes that are multiples of ``multiple`` (the model's largest stride)."""
    if values is None:
        return None
    values = list(values)
    if not all(v > 0 and v % multiple == 0 for v in values):
        shown = " ".join(map(str, values))
        raise usage_error(f"{flag} {shown}: expected positive multiples of {multiple} (the model's largest stride)")
    return values


def device(name: str | None, flag: str = "-d"):
    """The torch.device for ``name`` when this machine has it (None passes: the config decides)."""
    if name is None:
        return None
    from dfine.devices import check_device

    return check_device(name, label=f"{flag} {name}")
