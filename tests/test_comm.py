"""The byte counter and backend routing, on real gloo ranks."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from phantom_plugin import comm
from phantom_plugin.comm import CommCounter, CommRecord

pytestmark = pytest.mark.fast


def _record(n):
    return CommRecord("all_gather", "ring", 2, n, torch.float32, 4 * n, 2 * n)


def test_counter_is_bounded_but_keeps_totals_and_windows():
    c = CommCounter(max_records=10)
    for i in range(25):
        c.add(_record(i))
    assert len(c.records) <= 10
    assert c.sent_bytes == sum(2 * i for i in range(25))
    with c.window() as w:
        for i in range(4):
            c.add(_record(100 + i))
    assert [r.numel for r in w] == [100, 101, 102, 103]
    c.reset()
    assert c.sent_bytes == 0 and c.records == [] and c.by_op() == {}


class _Wire:
    """A backend that casts floating tensors to bf16 for the wire, over torch.distributed."""
    __name__ = "bf16-wire"
    wire_dtype = torch.bfloat16

    def _cast(self, fn, out, inp, **kw):
        out_w = torch.empty_like(out, dtype=torch.bfloat16)
        work = fn(out_w, inp.to(torch.bfloat16), **kw)
        work.wait()
        out.copy_(out_w)
        return work

    def all_gather_into_tensor(self, out, inp, group=None, async_op=False):
        return self._cast(dist.all_gather_into_tensor, out, inp, group=group, async_op=True)

    def reduce_scatter_tensor(self, out, inp, group=None, async_op=False):
        return self._cast(dist.reduce_scatter_tensor, out, inp, group=group, async_op=True)

    def all_to_all_single(self, out, inp, group=None, async_op=False):
        return self._cast(dist.all_to_all_single, out, inp, group=group, async_op=True)

    def all_reduce(self, t, group=None, async_op=False):
        return dist.all_reduce(t, group=group, async_op=async_op)


def _routed(rank, p):
    g = dist.group.WORLD
    x = torch.full((4,), float(rank + 1))
    comm.COUNTER.reset()
    plain = comm.all_gather(x, g)
    with comm.use_backend(_Wire()):
        narrow = comm.all_gather(x, g)
    assert torch.equal(plain, narrow)                     # small integers survive bf16
    sizes = [r.sent_bytes for r in comm.COUNTER.records]
    assert sizes == [4 * 4 * (p - 1), 4 * 2 * (p - 1)], sizes
    return True


def test_routed_backend_is_used_and_counted_at_its_wire_dtype():
    run_ranks(_routed, 2)
