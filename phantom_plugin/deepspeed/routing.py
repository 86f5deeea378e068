"""Route the plugin's collectives through ``deepspeed.comm``, optionally in a narrower dtype.

Each phantom engine owns one route, active while the engine runs its model (see
:mod:`.engine`): its phantom collectives then go through ``deepspeed.comm`` (so the
``comms_logger`` section reports ghost traffic next to ZeRO's). With ``comm_dtype`` set,
floating-point tensors are cast to it for the wire and cast back on completion: the message
sizes in DeepSpeed's comms log are then the narrow ones, and a
:class:`phantom_plugin.comm.CommCounter` counts the same narrow bytes (it reads
:attr:`DeepSpeedRoute.wire_dtype`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dtypes

__all__ = ["DeepSpeedRoute", "COMM_DTYPES"]

COMM_DTYPES = {name: dtypes.torch_dtype(name) for name, d in dtypes.DTYPES.items() if d.bytes <= 4}
"""``comm_dtype`` name -> wire ``torch.dtype``: the dtypes of :data:`phantom_plugin.dtypes.DTYPES`
that keep or narrow fp32 (fp64 never narrows a wire)."""


class _CastBack:
    """Wraps a work handle: on ``wait`` copies the wire buffers back into the caller's tensors."""

    def __init__(self, work, pairs):
        self._work, self._pairs = work, pairs

    def wait(self, *args, **kwargs):
        ok = self._work.wait(*args, **kwargs) if self._work is not None else True
        for dst, src in self._pairs:
            dst.copy_(src)
        self._pairs = []
        return ok


class DeepSpeedRoute:
    """A backend for :func:`phantom_plugin.comm.use_backend`: ``deepspeed.comm`` plus an optional wire dtype."""

    def __init__(self, ds_comm, wire_dtype: Optional[torch.dtype] = None):
        self._ds, self._wire = ds_comm, wire_dtype
        self.wire_dtype = wire_dtype
        self.__name__ = "deepspeed.comm" + ("" if wire_dtype is None else f"[{wire_dtype}]")

    def _narrow(self, t: torch.Tensor) -> bool:
        return self._wire is not None and t.is_floating_point() and t.dtype != self._wire

    def _run(self, fn, out: torch.Tensor, inp: Optional[torch.Tensor], async_op: bool, **kw):
        if not self._narrow(out):
            return fn(out, inp, async_op=async_op, **kw) if inp is not None else fn(out, async_op=async_op, **kw)
        out_w = out.to(self._wire) if inp is None else torch.empty_like(out, dtype=self._wire)
        args = (out_w,) if inp is None else (out_w, inp.to(self._wire))
        work = _CastBack(fn(*args, async_op=async_op, **kw), [(out, out_w)])
        if async_op:
            return work
        work.wait()
        return None

    def all_gather_into_tensor(self, output_tensor, tensor, group=None, async_op=False):
        return self._run(self._ds.all_gather_into_tensor, output_tensor, tensor, async_op, group=group)

    def reduce_scatter_tensor(self, output_tensor, tensor, group=None, async_op=False):
        return self._run(self._ds.reduce_scatter_tensor, output_tensor, tensor, async_op, group=group)

    def all_to_all_single(self, output, tensor, group=None, async_op=False):
        return self._run(self._ds.all_to_all_single, output, tensor, async_op, group=group)

    def all_reduce(self, tensor, group=None, async_op=False):
        return self._run(self._ds.all_reduce, tensor, None, async_op, group=group)
