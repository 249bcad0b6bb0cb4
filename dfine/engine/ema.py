"""Exponential moving average (EMA) of a model's weights, evaluated instead of the raw weights by default."""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn as nn

from dfine.registry import EMAS

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


@EMAS.register
class ModelEMA:
    """EMA of every floating-point entry of the state dict (parameters and BatchNorm statistics).

    After the n-th update (n = ``updates``) the weights are ``ema = d_n * ema + (1 - d_n) * model`` with the
    ramped decay ``d_n = decay * (1 - exp(-n / warmups))``, which lets early epochs move the average quickly.
    ``start`` skips that many first updates. At the no-augmentation phase the trainer calls ``restart()``,
    which switches ``decay`` to ``restart_decay`` (the reference's ``ema_restart_decay``); the decay is read at
    every update, so the new value really applies (the reference captured it once in a closure).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmups: int = 1000,
        start: int = 0,
        restart_decay: float | None = None,
    ):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmups = int(warmups)
        self.start = int(start)
        self.restart_decay = float(restart_decay) if restart_decay is not None else float(decay)
        self.updates = 0
        self.skipped = 0

    def current_decay(self, updates: int | None = None) -> float:
        n = self.updates if updates is None else updates
        if self.warmups <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-n / self.warmups))

    def _float_entries(self) -> tuple[list[str], list[torch.Tensor]]:
        """Names and tensors of the EMA's floating-point state, each storage once (aliased entries such as
        ``decoder.up``/``decoder.decoder.up`` share one tensor and must be averaged once)."""
        seen, names, tensors = set(), [], []
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if tensor.dtype.is_floating_point and id(tensor) not in seen:
                seen.add(id(tensor))
                names.append(name)
                tensors.append(tensor.data if isinstance(tensor, nn.Parameter) else tensor)
        return names, tensors

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.skipped < self.start:
            self.skipped += 1
            return
        self.updates += 1
        d = self.current_decay()
        names, ema_tensors = self._float_entries()
        source = unwrap(model).state_dict()
        model_tensors = [source[n].detach().to(e.dtype) for n, e in zip(names, ema_tensors)]
        # lerp: ema + (1 - d) * (model - ema) == d * ema + (1 - d) * model, fused over all tensors
        torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - d)

    def restart(self, decay: float | None = None) -> None:
        """Switch to the no-augmentation decay (``restart_decay`` unless given)."""
        self.decay = float(self.restart_decay if decay is None else decay)
        logger.info("EMA restarted: decay %.6f from update %d on", self.decay, self.updates)

    def to(self, *args, **kwargs) -> "ModelEMA":
        self.module = self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "skipped": self.skipped}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.module.load_state_dict(state["module"], strict=strict)
        self.updates = int(state.get("updates", 0))
        if "decay" in state:
            self.decay = float(state["decay"])
        self.skipped = int(state.get("skipped", self.start))

    def __repr__(self) -> str:
        return f"ModelEMA(decay={self.decay}, warmups={self.warmups}, updates={self.updates})"
