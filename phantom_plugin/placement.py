"""Which device a collective runs on, from the tensor and the group's per-device backends.

``torch.distributed.get_backend_config`` names a backend per device type (``"cpu:gloo,cuda:nccl"``;
a world initialised without a backend reports ``"undefined"`` and resolves it per device). A
collective runs on the tensor's own device when a backend serves it, else it is moved (by
:mod:`comm`) to the CPU or to this rank's CUDA device. gloo is used for CPU tensors only.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["collective_device", "group_backends"]


# Devices each backend serves when a group names a bare backend. gloo is taken as CPU-only on
# purpose: its CUDA paths stage through host memory anyway, and not every collective has one.
_CAPABILITY = {"gloo": ("cpu",), "nccl": ("cuda",), "xccl": ("xpu",), "mpi": ("cpu",),
               "ucc": ("cpu", "cuda"), "hccl": ("npu",)}
# torch's lazily initialised "undefined" backend: one backend per device type on first use
_UNDEFINED = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl"}


@functools.lru_cache(maxsize=64)
def _parse_backends(config: str) -> tuple[tuple[str, str], ...]:
    """``"cpu:gloo,cuda:nccl"`` / ``"nccl"`` / ``"undefined"`` -> ((device type, backend), ...)."""
    out: dict[str, str] = {}
    for part in config.lower().replace(" ", "").split(","):
        if ":" in part:
            device, name = part.split(":", 1)
            out.setdefault(device, name)
        elif part == "undefined":
            for device, name in _UNDEFINED.items():
                out.setdefault(device, name)
        elif part:
            for device in _CAPABILITY.get(part, ("cpu", "cuda")):
                out.setdefault(device, part)
    return tuple(out.items())


def group_backends(group: Optional[dist.ProcessGroup]) -> dict[str, str]:
    """``{device type: backend name}`` of ``group`` (``{}`` without torch.distributed).

    Read from ``torch.distributed.get_backend_config`` (``"cpu:gloo,cuda:nccl"``; a bare
    ``"nccl"`` serves CUDA only, ``"gloo"`` is used for CPU tensors only).
    """
    if not dist.is_initialized():
        return {}
    try:
        config = dist.get_backend_config(group)
    except (AttributeError, ValueError, RuntimeError):
        config = str(dist.get_backend(group))
    return dict(_parse_backends(str(config)))


def _served(group) -> dict[str, str]:
    return {d: b for d, b in group_backends(group).items() if not (b == "gloo" and d != "cpu")}


def _is_gloo(group, device: torch.device) -> bool:
    return group_backends(group).get(device.type) == "gloo" or (
        device.type != "cpu" and device.type not in _served(group))


def _rank_cuda_device(group) -> torch.device:
    """This rank's CUDA device: the group's bound device, else the current device once it is set."""
    bound = getattr(group if group is not None else dist.group.WORLD, "bound_device_id", None)
    if bound is not None:
        return bound
    current = torch.cuda.current_device()
    local, count = os.environ.get("LOCAL_RANK"), torch.cuda.device_count()
    if current == 0 and local is not None and local.isdigit() and count > 1 and int(local) % count:
        raise RuntimeError(
            f"phantom_plugin: this rank (LOCAL_RANK={local}) still has cuda:0 as its current device, "
            "so its NCCL collectives would run on cuda:0 with every other rank's. Call "
            f"torch.cuda.set_device({int(local) % count}) (or init_process_group(device_id=...)) "
            "before building or running phantom layers")
    return torch.device("cuda", current)


def collective_device(group: Optional[dist.ProcessGroup],
                      like: Optional[torch.Tensor] = None) -> torch.device:
    """The device a collective of ``group`` runs on for a tensor like ``like``.

    ``like``'s own device when one of the group's backends serves its device type (NCCL: CUDA;
    gloo: CPU), else the CPU when the group serves it, else this rank's CUDA device (the group's
    bound device, or ``torch.cuda.current_device()``, refused while a nonzero ``LOCAL_RANK``
    still points at ``cuda:0``). ``like=None`` (small setup tensors) prefers the CPU.
    """
    if not dist.is_initialized():
        return like.device if like is not None else torch.device("cpu")
    served = _served(group)
    if like is not None and like.device.type in served:
        return like.device
    if "cpu" in served:
        return torch.device("cpu")
    if "cuda" in served:
        return _rank_cuda_device(group)
    if served:
        return torch.device(next(iter(served)))
    raise RuntimeError(f"phantom_plugin: process group with backend {dist.get_backend(group)!r} "
                       "serves no device this plugin can use; create it with backend 'nccl', "
                       "'gloo' or 'cpu:gloo,cuda:nccl'")
