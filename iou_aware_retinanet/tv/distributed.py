"""Multi-process helpers of the torchvision front-end over ``torch.distributed``.

Detectron2's conventions (its ``launch`` and ``comm`` utilities), written here
because this front-end must run without Detectron2:

    torchrun --nproc_per_node N -m iou_aware_retinanet train --config-file FILE

:func:`init_from_env` reads torchrun's ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` and starts the process
group (``nccl`` on CUDA, ``gloo`` on CPU) when ``WORLD_SIZE > 1``. Without it
(one process) every helper here is a no-op returning the single-process
answer, and nothing calls a collective: a single process computes exactly
what it did before this module existed.
"""
import logging
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "all_gather",
    "all_reduce_mean",
    "any_true",
    "broadcast_object",
    "env_world_size",
    "gather",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_main_process",
    "synchronize",
]


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if get_world_size() > 1 else 0


def is_main_process() -> bool:
    return get_rank() == 0


def init_from_env(device: str) -> int:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; returns the world size.

    ``device`` is ``MODEL.DEVICE``: "cuda" pins this process to GPU ``LOCAL_RANK``
    and uses nccl, anything else gloo.
    """
    world = env_world_size()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return get_world_size()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the processes with torchrun")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)  # "cuda" then means this process's GPU
    backend = "nccl" if cuda else "gloo"
    if not dist.is_backend_available(backend):
        raise RuntimeError(f"WORLD_SIZE={world} needs the {backend} backend, which this torch build lacks")
    dist.init_process_group(backend=backend, init_method="env://")
    logger.info("Process group: %s, rank %d of %d", backend, get_rank(), get_world_size())
    return get_world_size()


def synchronize() -> None:
    """A barrier over all processes (none in one process)."""
    if get_world_size() > 1:
        dist.barrier()


def _tensor_device() -> torch.device:
    # nccl communicates CUDA tensors only.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """``obj`` of every rank on rank ``dst`` (in rank order), None on the others."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (a failure that must stop all ranks together)."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_tensor_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_mean(values: dict) -> dict:
    """The mean over ranks of each float in ``values`` (same keys, in the same order, on every rank)."""
    if get_world_size() == 1:
        return dict(values)
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_tensor_device())
    dist.all_reduce(t)
    t /= get_world_size()
    return dict(zip(keys, t.tolist()))
