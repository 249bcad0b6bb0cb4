"""torch.distributed helpers. ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them we are one process.

NCCL on CUDA, gloo on CPU; multi-node jobs come through torchrun's rendezvous, so nothing here is node-aware.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from dfine.devices import check_device

# the process-group queries live below both engine/ and evaluation/; re-exported for the engine's callers
from dfine.utils.distributed import (  # noqa: F401
    all_gather_objects,
    broadcast_object,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
)

logger = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    """The device for this process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(name)  # a DeviceError (one line, listing this machine's devices) when it does not exist
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = check_device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device, timeout_minutes: float = 30) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). Returns True when distributed.
    ``timeout_minutes`` bounds every collective: a rank that died or hangs makes the others fail after that
    long instead of waiting forever (see ``dfine.errors.CollectiveTimeout``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=float(timeout_minutes))
    store = _attempt_store(world_size, timeout)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size, timeout=timeout)
    logger.info("process group: backend %s, rank %d of %d", backend, get_rank(), get_world_size())
    return True


def _attempt_store(world_size: int, timeout: timedelta):
    """Under torchrun (TORCHELASTIC_USE_AGENT_STORE) the process group lives in the agent's store, which outlives
    an elastic restart. This torch (2.14) no longer prefixes it per attempt, so a restarted rank can read the
    gloo address a dead rank of the previous attempt left there, and the connect is refused or hangs until the
    timeout (seen in tests/test_engine_faults.py). The store is therefore opened here with the attempt in the
    prefix. None outside torchrun: the default env:// rendezvous is used."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dfine/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store)


def cleanup_distributed(wait_for_others: bool = True) -> None:
    if is_distributed():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed (optionally with SyncBatchNorm)."""
    if not is_distributed():
        return model
    if sync_bn and device.type == "cuda":
        # converts in place (children are swapped, parameters shared), so optimizer and EMA stay valid
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn and is_main_process():  # the same on every rank: say it once
        logger.warning("sync_bn is ignored on %s (SyncBatchNorm needs CUDA); each rank normalises its own batch", device)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


@torch.no_grad()
def reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over ranks of each scalar tensor (for logging); the dict order is kept."""
    if not is_distributed() or not values:
        return values
    names = list(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    dist.all_reduce(stacked)
    stacked /= get_world_size()
    return dict(zip(names, stacked))


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over ranks, in one all-reduce (``values`` itself when not distributed)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` is true on every rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def is_collective_failure(err: BaseException) -> bool:
    """True for the errors a timed-out or broken collective raises (gloo and NCCL)."""
    if isinstance(err, getattr(dist, "DistBackendError", ())) or isinstance(err, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        word in text for word in ("timed out", "timeout", "connection closed by peer", "connection reset by peer")
    )
