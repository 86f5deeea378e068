"""Raw collectives for phantom parallelism (the opt-in byte counter they report to is :mod:`.counter`).

Every collective the plugin issues goes through this module. Each call

* takes its ``group`` explicitly and returns at once when the group has one rank;
* is recorded (op, algorithm, group size, payload and bytes *sent by this rank*) into every
  :class:`CommCounter` active at the time: none by default, so nothing is kept and recording
  costs one check; a caller that wants the bytes opens its own counter
  (``with comm.CommCounter() as counter: ...``);
* goes through the backend of the innermost :func:`use_backend` block (``deepspeed.comm`` while a
  DeepSpeed engine runs its model), so other tools' communication loggers see it too;
* waits at most :func:`collective_timeout`'s bound, when one was set around the call, for a result
  on the CPU.

Routing, timeouts and active counters are process-wide while their ``with`` block lasts (not
per-thread: autograd runs the backward of a CUDA graph on its own device threads) and are
restored on leaving it; nothing is switched on at import.

Bytes sent per rank assume the bandwidth-optimal ring algorithms that NCCL and gloo use: an
all-gather or reduce-scatter of a ``p``-chunk tensor sends ``(p-1)`` chunks per rank, an
all-reduce ``2(p-1)`` chunks, an all-to-all ``(p-1)`` chunks. gloo has no reduce-scatter
algorithm (torch's gloo ``reduce_scatter`` runs an all-reduce, ``2(p-1)`` chunks), so on gloo
:func:`reduce_scatter` is an all-to-all plus a local sum (``algorithm="all_to_all+sum"``,
``(p-1)`` chunks); a third-party gloo reduce-scatter seen by :func:`intercept_torch_collectives`
is recorded as ``allreduce+slice`` with ``2(p-1)``. These counts were checked against the
loopback interface's transmitted-byte counter (``benchmarks/wire_check.py``).

Devices: each collective runs on the device the group's backend serves for the tensor's device
type (:func:`collective_device`, decided from the tensor and the group's per-device backends, so
``"undefined"``, ``"nccl"`` and ``"cpu:gloo,cuda:nccl"`` groups all work); a tensor on another
device is moved there and the result moved back (a CPU tensor through an NCCL-only group, a CUDA
tensor through gloo). On CUDA, ``wait()`` only orders the current stream after the collective
(no host block); timeouts there are the process group's own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import inspect
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .counter import CommCounter, CommRecord, active_counters
from .placement import _is_gloo, collective_device, group_backends

__all__ = [
    "CommRecord", "CommCounter", "Handle", "group_size", "group_rank",
    "all_gather", "reduce_scatter", "all_reduce", "all_to_all", "use_backend",
    "collective_timeout", "intercept_torch_collectives", "collective_device", "group_backends",
]


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """World size of ``group``; 1 when torch.distributed is not initialized and ``group`` is None."""
    if group is None and not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    if group is None and not dist.is_initialized():
        return 0
    return dist.get_rank(group)


# --- backend routing ----------------------------------------------------------------------

@dataclasses.dataclass
class _Backend:
    name: str
    all_gather_into_tensor: Callable
    reduce_scatter_tensor: Callable
    all_reduce: Callable
    all_to_all_single: Callable
    wire_dtype: Optional[torch.dtype] = None   # floating tensors travel in this dtype


def _torch_backend() -> _Backend:
    # torch >= 2.12 renames the tensor collectives *_single and warns on the old names.
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return _Backend("torch", ag, rs, dist.all_reduce, dist.all_to_all_single)


_BACKEND = _torch_backend()
"""The backend of the innermost :func:`use_backend` block (torch.distributed outside any)."""
_TIMEOUT: Optional[datetime.timedelta] = None
"""The bound of the innermost :func:`collective_timeout` block (none outside any)."""


@contextlib.contextmanager
def use_backend(module) -> Iterator[None]:
    """Route collectives through ``module`` (e.g. ``deepspeed.comm``) inside the block.

    ``module`` must provide ``all_gather_into_tensor``, ``reduce_scatter_tensor``,
    ``all_reduce`` and ``all_to_all_single`` with torch.distributed's signatures. A module with a
    ``wire_dtype`` attribute (a backend that casts floating tensors for the wire) has its bytes
    counted at that dtype. Process-wide while the block lasts (see the module docstring); blocks
    nest, and leaving one restores the backend that was in use before it.
    """
    global _BACKEND
    previous = _BACKEND
    _BACKEND = _Backend(getattr(module, "__name__", str(module)), module.all_gather_into_tensor,
                        module.reduce_scatter_tensor, module.all_reduce, module.all_to_all_single,
                        getattr(module, "wire_dtype", None))
    try:
        yield
    finally:
        _BACKEND = previous


@contextlib.contextmanager
def collective_timeout(seconds: Optional[float]) -> Iterator[None]:
    """Bound each wait on a collective issued inside the block whose result is on the CPU.

    ``seconds=None``: the process group's own timeout. A collective keeps the bound in effect when
    it was issued, wherever it is waited on; a wait past it raises ``RuntimeError``. Process-wide
    while the block lasts; blocks nest, and leaving one restores the previous bound.

    Waits on CUDA results are never bounded here: a bounded NCCL wait blocks the host until the
    collective ends, which removes the overlap of communication with compute. There the process
    group's timeout (``init_process_group(timeout=...)``, NCCL's watchdog) applies.
    """
    global _TIMEOUT
    previous = _TIMEOUT
    _TIMEOUT = None if seconds is None else datetime.timedelta(seconds=seconds)
    try:
        yield
    finally:
        _TIMEOUT = previous


class Handle:
    """An in-flight collective; :meth:`wait` returns its result tensor.

    It waits at most the :func:`collective_timeout` bound in effect when it was created (issued).
    """

    def __init__(self, work, result: torch.Tensor, finish: Optional[Callable] = None):
        self._work, self._result, self._finish = work, result, finish
        self._timeout = _TIMEOUT

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            if self._timeout is not None and self._result.device.type == "cpu":
                ok = self._work.wait(timeout=self._timeout)
                if ok is False:
                    raise RuntimeError(f"collective timed out after {self._timeout}")
            else:
                self._work.wait()
            self._work = None
            if self._finish is not None:
                self._result = self._finish(self._result)
        return self._result


def _record(op: str, algorithm: str, p: int, t: torch.Tensor, chunks_sent: int, tag: str) -> None:
    counters = active_counters()
    if not counters:
        return
    wire = _BACKEND.wire_dtype if t.is_floating_point() else None
    payload = t.numel() * (t.element_size() if wire is None else wire.itemsize)
    record = CommRecord(op, algorithm, p, t.numel(), t.dtype, payload, payload // p * chunks_sent, tag)
    for counter in counters:
        counter.add(record)


def _on(x: torch.Tensor, group) -> tuple[torch.Tensor, Optional[Callable]]:
    """``x`` on the collective's device, and how to bring a result back (``None``: it is home)."""
    dev = collective_device(group, x)
    if dev == x.device:
        return x, None
    home = x.device
    return x.to(dev), (lambda r: r.to(home))


def all_gather(x: torch.Tensor, group: Optional[dist.ProcessGroup], *, async_op: bool = False,
               tag: str = ""):
    """Gather ``x`` ``[m, ...]`` from every rank into ``[p, m, ...]`` (rank order).

    Returns the tensor (on ``x``'s device), or a :class:`Handle` when ``async_op``.
    """
    p = group_size(group)
    if p == 1:
        out = x.unsqueeze(0)
        return Handle(None, out) if async_op else out
    if x.dim() == 0:
        x = x.reshape(1)
    x, back = _on(x.contiguous(), group)
    # backends gather along dim 0 into [p*m, ...]; the [p, m, ...] view of it is free
    flat = torch.empty((p * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _record("all_gather", "ring", p, flat, p - 1, tag)
    work = _BACKEND.all_gather_into_tensor(flat, x, group=group, async_op=True)
    h = Handle(work, flat.view((p,) + tuple(x.shape)), finish=back)
    return h if async_op else h.wait()


def reduce_scatter(x: torch.Tensor, group: Optional[dist.ProcessGroup], *, async_op: bool = False,
                   tag: str = ""):
    """Sum ``x`` ``[p, m, ...]`` over ranks and return this rank's chunk ``[m, ...]``.

    gloo has no reduce-scatter algorithm of its own (torch's gloo backend runs an all-reduce and
    keeps a slice, ``2(p-1)`` chunks per rank, measured on the loopback interface). Here, when
    the collective runs on gloo (CPU), each rank instead sends chunk ``j`` to rank ``j`` with one
    all-to-all and sums the ``p`` chunks it receives: a true reduce-scatter, ``(p-1)`` chunks per
    rank as NCCL's ring, in one round of messages. Every other backend (NCCL for CUDA tensors)
    runs its native reduce-scatter.
    """
    p = group_size(group)
    if p == 1:
        out = x[0]
        return Handle(None, out) if async_op else out
    if x.shape[0] != p:
        raise ValueError(f"reduce_scatter: leading dim {x.shape[0]} != group size {p}")
    chunk_shape = tuple(x.shape[1:])
    x, back = _on(x, group)
    flat = x.reshape((p * x.shape[1],) + tuple(x.shape[2:])) if x.dim() > 1 else x.contiguous()
    if _is_gloo(group, flat.device):
        recv = torch.empty_like(flat)
        _record("reduce_scatter", "all_to_all+sum", p, flat, p - 1, tag)
        work = _BACKEND.all_to_all_single(recv, flat, group=group, async_op=True)

        def finish(r):
            r = r.view((p,) + chunk_shape).sum(0)
            return r if back is None else back(r)
        h = Handle(work, recv, finish=finish)
        return h if async_op else h.wait()
    out = torch.empty((flat.shape[0] // p,) + tuple(flat.shape[1:]), dtype=x.dtype, device=x.device)
    _record("reduce_scatter", "ring", p, flat, p - 1, tag)
    work = _BACKEND.reduce_scatter_tensor(out, flat, group=group, async_op=True)
    h = Handle(work, out.view(chunk_shape), finish=back)
    return h if async_op else h.wait()


def all_reduce(x: torch.Tensor, group: Optional[dist.ProcessGroup], *, async_op: bool = False,
               tag: str = ""):
    """Sum ``x`` over ranks, in place (``x`` itself holds the result after ``wait``)."""
    p = group_size(group)
    if p == 1:
        return Handle(None, x) if async_op else x
    home = x
    x, back = _on(x, group)
    _record("all_reduce", "ring", p, x, 2 * (p - 1), tag)
    work = _BACKEND.all_reduce(x, group=group, async_op=True)
    h = Handle(work, x, finish=None if back is None else (lambda r: home.copy_(r)))
    return h if async_op else h.wait()


def all_to_all(x: torch.Tensor, group: Optional[dist.ProcessGroup], *, async_op: bool = False,
               tag: str = ""):
    """Send chunk ``x[j]`` of ``x`` ``[p, m, ...]`` to rank ``j``; chunk ``j`` of the result came from rank ``j``."""
    p = group_size(group)
    if p == 1:
        return Handle(None, x) if async_op else x
    if x.shape[0] != p:
        raise ValueError(f"all_to_all: leading dim {x.shape[0]} != group size {p}")
    shape = x.shape
    x, back = _on(x, group)
    x = x.reshape((p * x.shape[1],) + tuple(x.shape[2:])) if x.dim() > 1 else x.contiguous()
    out = torch.empty_like(x)
    _record("all_to_all", "pairwise", p, x, p - 1, tag)
    work = _BACKEND.all_to_all_single(out, x, group=group, async_op=True)
    h = Handle(work, out.view(shape), finish=back)
    return h if async_op else h.wait()


# --- counting collectives issued by other libraries (e.g. megatron-core's TP layers) -------

_INTERCEPTED = {
    # torch.distributed name: (op, chunks of payload/p sent per rank, argument holding the payload)
    "all_reduce": ("all_reduce", lambda p: 2 * (p - 1), "tensor"),
    "all_gather_into_tensor": ("all_gather", lambda p: p - 1, "output_tensor"),
    "all_gather_single": ("all_gather", lambda p: p - 1, "output_tensor"),
    "reduce_scatter_tensor": ("reduce_scatter", lambda p: p - 1, "input"),
    "reduce_scatter_single": ("reduce_scatter", lambda p: p - 1, "input"),
    "all_to_all_single": ("all_to_all", lambda p: p - 1, "input"),
}


@contextlib.contextmanager
def intercept_torch_collectives(tag: str = "external") -> Iterator[None]:
    """Count collectives that third-party code calls on ``torch.distributed`` directly.

    Patches the ``torch.distributed`` attributes listed in ``_INTERCEPTED`` for the duration of
    the block, so calls such as megatron-core's ``torch.distributed.all_reduce(...)`` are
    recorded, with ring-algorithm byte counts, into every :class:`CommCounter` active at the time
    of the call (none: nothing is recorded). The calls themselves are unchanged. Collectives this
    module issues are counted by it already and are not seen here.
    """
    originals = {}

    def wrap(fn, op, chunks, payload_arg):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not active_counters():
                return fn(*args, **kwargs)
            bound = sig.bind_partial(*args, **kwargs).arguments
            group = bound.get("group")
            p = group_size(group)
            if p > 1:
                payload = bound[payload_arg]
                if op == "reduce_scatter" and _is_gloo(group, payload.device):
                    _record(op, "allreduce+slice", p, bound[payload_arg], 2 * (p - 1), tag)
                else:
                    _record(op, "ring", p, bound[payload_arg], chunks(p), tag)
            return fn(*args, **kwargs)
        return wrapper

    for name, (op, chunks, payload_arg) in _INTERCEPTED.items():
        fn = getattr(dist, name, None)
        if fn is not None:
            originals[name] = fn
            setattr(dist, name, wrap(fn, op, chunks, payload_arg))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
