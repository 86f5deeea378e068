"""Traceable raw collectives: the :mod:`comm` calls the phantom ops make, on torch's functional collectives.

``torch.compile`` cannot trace a c10d work handle (``async_op=True``), so under compilation
(``torch.compiler.is_compiling()``) :mod:`ops` issues its collectives here instead of in
:mod:`comm`. Each function has :mod:`comm`'s signature and returns the same kind of result: the
tensor, or with ``async_op=True`` a :class:`Pending` whose :meth:`~Pending.wait` returns it. The
collectives are the ``torch.ops._c10d_functional`` ops behind
``torch.distributed._functional_collectives`` (what torchtitan's async tensor parallelism issues):
an op returns its output at once while the collective runs, and ``wait_tensor`` (here:
``Pending.wait``) blocks only when the result is read, so a collective issued before a local GEMM
overlaps it, in eager mode and in the compiled graph alike.

What :mod:`comm` does and this module does not, under compilation (``docs/pytorch.md``,
"torch.compile"):

* **byte counter**: a compiled graph cannot run Python when a collective runs, so it cannot add
  :class:`~phantom_plugin.counter.CommRecord` s. Tracing a phantom collective while a
  :class:`~phantom_plugin.counter.CommCounter` is active raises ``RuntimeError`` (a counter started
  after compilation makes torch recompile, and that raises too): counts never read 0 for traffic
  that ran. Outside compilation (this module forced in eager mode with
  :func:`phantom_plugin.ops.use_functional_collectives`) records are kept as :mod:`comm` keeps them.
* **timeout**: :func:`comm.collective_timeout` cannot bound a wait inside a graph; tracing under a
  bound raises ``RuntimeError``.
* **routing** (in eager mode too): the collective runs on ``group`` through torch's own c10d,
  not through the :func:`comm.use_backend` module (DeepSpeed's comms logger does not see it); a backend's
  ``wire_dtype`` is honoured by casting floating tensors for the wire and back, as the DeepSpeed
  route does.
* **devices**: the tensor must be on a device the group serves (gloo: CPU, NCCL: CUDA); the CPU
  tensor through an NCCL group that :mod:`comm` moves is an error here.

gloo (CPU): the reduce-scatter is an all-to-all plus a local sum, as in :mod:`comm` (gloo's own
runs an all-reduce, twice the bytes).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import comm
from .counter import active_counters
from .placement import _parse_backends, group_backends

__all__ = ["Pending", "all_gather", "reduce_scatter", "all_to_all"]

_C = torch.ops._c10d_functional


class Pending:
    """An issued functional collective; :meth:`wait` waits for it and returns the result."""

    def __init__(self, out: torch.Tensor, finish: Optional[Callable] = None, issued: bool = True):
        self._out, self._finish, self._issued = out, finish, issued

    def wait(self) -> torch.Tensor:
        out = _C.wait_tensor(self._out) if self._issued else self._out
        return out if self._finish is None else self._finish(out)


def _name(group: Optional[dist.ProcessGroup]) -> str:
    return (group if group is not None else dist.group.WORLD).group_name


def _backends(group) -> dict[str, str]:
    """:func:`placement.group_backends`, without its cache while tracing (Dynamo warns on lru_cache)."""
    if not torch.compiler.is_compiling():
        return group_backends(group)
    return dict(_parse_backends.__wrapped__(str(dist.get_backend_config(group))))


def _refusal(op: str, group, x: torch.Tensor) -> Optional[str]:
    """Why ``op`` cannot run here (see the module docstring), or None.

    The collective raises it in its own frame: raised inside a helper, the exception let Dynamo
    (torch 2.13, without ``fullgraph``) break the graph at the helper's call, run the helper
    eagerly (where it passes) and compile the collective, uncounted. Raised in the collective's
    frame, the compiled call raises it, with ``fullgraph=True`` or without.
    """
    if torch.compiler.is_compiling():
        if active_counters():
            return (f"phantom_plugin: a CommCounter is active while torch.compile traces the phantom "
                    f"{op}; a compiled graph cannot record its collectives, so the counter would "
                    "miss them. Count an eager run (the bytes are the same), or start the counter "
                    "outside the compiled call (docs/pytorch.md, 'torch.compile')")
        if comm._TIMEOUT is not None:
            return (f"phantom_plugin: comm.collective_timeout is set while torch.compile traces the "
                    f"phantom {op}; a compiled graph cannot bound its waits. Leave the compiled "
                    "call outside the collective_timeout block, or use the process group's timeout "
                    "(init_process_group(timeout=...))")
    backends = _backends(group)
    served = backends.get(x.device.type)
    if served is None or (served == "gloo" and x.device.type != "cpu"):
        return (f"phantom_plugin: the traced {op} got a {x.device.type} tensor, which this process "
                f"group ({backends or 'no backend'}) does not serve; under torch.compile keep the "
                "phantom activations on the group's device (gloo: CPU, NCCL: CUDA)")
    return None


def _wire(x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.dtype]]:
    """``x`` in the routed backend's wire dtype, and the dtype to cast results back to (or None)."""
    wire = comm._BACKEND.wire_dtype
    if wire is None or not x.is_floating_point() or x.dtype == wire:
        return x, None
    return x.to(wire), x.dtype


def _record(op: str, algorithm: str, p: int, t: torch.Tensor, chunks: int, tag: str) -> None:
    if not torch.compiler.is_compiling():
        comm._record(op, algorithm, p, t, chunks, tag)


def _done(back: Optional[torch.dtype], finish: Callable) -> Callable:
    """Cast the waited result back from the wire dtype (first, as the DeepSpeed route does), then ``finish``."""
    return finish if back is None else (lambda r: finish(r.to(back)))


def all_gather(x: torch.Tensor, group: Optional[dist.ProcessGroup], *, async_op: bool = False,
               tag: str = ""):
    """``x [m, ...]`` from every rank -> ``[p, m, ...]`` (rank order); as :func:`comm.all_gather`."""
    p = comm.group_size(group)
    if p == 1:
        pending = Pending(x.unsqueeze(0), issued=False)
        return pending if async_op else pending.wait()
    if x.dim() == 0:
        x = x.reshape(1)
    refusal = _refusal("all_gather", group, x)
    if refusal is not None:
        raise RuntimeError(refusal)
    shape = (p,) + tuple(x.shape)
    w, back = _wire(x.contiguous())
    out = _C.all_gather_into_tensor(w, p, _name(group))                 # [p*m, ...]
    _record("all_gather", "ring", p, out, p - 1, tag)
    pending = Pending(out, _done(back, lambda r: r.view(shape)))
    return pending if async_op else pending.wait()


def reduce_scatter(x: torch.Tensor, group: Optional[dist.ProcessGroup], *, async_op: bool = False,
                   tag: str = ""):
    """Sum ``x [p, m, ...]`` over ranks, keep chunk ``rank`` ``[m, ...]``; as :func:`comm.reduce_scatter`."""
    p = comm.group_size(group)
    if p == 1:
        pending = Pending(x[0], issued=False)
        return pending if async_op else pending.wait()
    if x.shape[0] != p:
        raise ValueError(f"reduce_scatter: leading dim {x.shape[0]} != group size {p}")
    refusal = _refusal("reduce_scatter", group, x)
    if refusal is not None:
        raise RuntimeError(refusal)
    chunk_shape = tuple(x.shape[1:])
    w, back = _wire(x.contiguous())
    flat = w.reshape((-1,) + tuple(w.shape[2:])) if w.dim() > 1 else w
    if _backends(group).get(x.device.type) == "gloo":
        splits = [flat.shape[0] // p] * p
        out = _C.all_to_all_single(flat, splits, splits, _name(group))  # [p*m, ...]
        _record("reduce_scatter", "all_to_all+sum", p, flat, p - 1, tag)
        pending = Pending(out, _done(back, lambda r: r.view((p,) + chunk_shape).sum(0)))
    else:
        out = _C.reduce_scatter_tensor(flat, "sum", p, _name(group))   # [m, ...]
        _record("reduce_scatter", "ring", p, flat, p - 1, tag)
        pending = Pending(out, _done(back, lambda r: r.view(chunk_shape)))
    return pending if async_op else pending.wait()


def all_to_all(x: torch.Tensor, group: Optional[dist.ProcessGroup], *, async_op: bool = False,
               tag: str = ""):
    """Send ``x[j]`` of ``x [p, m, ...]`` to rank ``j``; as :func:`comm.all_to_all`."""
    p = comm.group_size(group)
    if p == 1:
        pending = Pending(x, issued=False)
        return pending if async_op else pending.wait()
    if x.shape[0] != p:
        raise ValueError(f"all_to_all: leading dim {x.shape[0]} != group size {p}")
    refusal = _refusal("all_to_all", group, x)
    if refusal is not None:
        raise RuntimeError(refusal)
    shape = tuple(x.shape)
    w, back = _wire(x.contiguous())
    flat = w.reshape((-1,) + tuple(w.shape[2:])) if w.dim() > 1 else w
    splits = [flat.shape[0] // p] * p
    out = _C.all_to_all_single(flat, splits, splits, _name(group))
    _record("all_to_all", "pairwise", p, flat, p - 1, tag)
    pending = Pending(out, _done(back, lambda r: r.view(shape)))
    return pending if async_op else pending.wait()
