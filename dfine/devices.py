"""Which devices this machine has, and a check that a requested one exists, before anything is built on it."""

from __future__ import annotations

import torch

from dfine.registry import ConfigError


class DeviceError(ConfigError):
    """A device that this machine does not have (or cannot be named so). The message lists those it has."""


def available_devices() -> list[str]:
    """``cpu``, then ``cuda:0`` ... ``cuda:N-1``, then ``mps`` where present."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if has_mps():
        found.append("mps")
    return found


def has_mps() -> bool:
    """Apple-silicon GPU (Metal) present."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def check_device(name: str | torch.device, label: str | None = None) -> torch.device:
    """The device ``name`` stands for; raises DeviceError (starting with ``label``, by default ``device 'name'``)
    when it does not exist here."""
    here = ", ".join(available_devices())
    label = label or f"device {str(name)!r}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{label}: not a device name; devices on this machine: {here}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{label}: CUDA is not available on this machine; devices here: {here}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{label}: this machine has {torch.cuda.device_count()} CUDA device(s); devices here: {here}"
            )
    elif device.type == "mps":
        if "mps" not in available_devices():
            raise DeviceError(f"{label}: MPS needs an Apple-silicon Mac; devices here: {here}")
    elif device.type != "cpu":
        raise DeviceError(f"{label}: not supported here; devices on this machine: {here}")
    return device


def amp_note(device: torch.device, use_amp: bool, amp_dtype: str | None) -> str | None:
    """Why a mixed-precision request will not do what the user hopes on ``device``, or None when it will."""
    if not use_amp or device.type != "cpu":
        return None
    if amp_dtype in ("float16", "fp16"):
        return ("use_amp with amp_dtype float16 on the CPU: CPUs have no fast float16 arithmetic, so this trains "
                "slower than fp32 and adds a GradScaler; set amp_dtype=bfloat16 (the CPU's mixed precision) or drop "
                "--use-amp")
    return None
