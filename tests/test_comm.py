"""The byte counter, backend routing and timeouts, on real gloo ranks."""
import datetime
import threading

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
    with CommCounter() as counter:
        plain = comm.all_gather(x, g)
        with comm.use_backend(_Wire()):
            narrow = comm.all_gather(x, g)
        after = comm.all_gather(x, g)                     # the block left: torch.distributed again
    assert torch.equal(plain, narrow) and torch.equal(plain, after)   # small integers survive bf16
    sizes = [r.sent_bytes for r in counter.records]
    assert sizes == [4 * 4 * (p - 1), 4 * 2 * (p - 1), 4 * 4 * (p - 1)], sizes
    return True


def test_routed_backend_is_used_and_counted_at_its_wire_dtype():
    run_ranks(_routed, 2)


def _ops(counter):
    return [r.op for r in counter.records]


def _counters(rank, p):
    g = dist.group.WORLD
    x = torch.ones(4)
    real_record = comm.CommRecord
    comm.CommRecord = None                        # no counter active: no record is even built
    try:
        comm.all_gather(x, g)
        comm.all_reduce(x.clone(), g)
    finally:
        comm.CommRecord = real_record
    late = CommCounter()
    assert not late.active
    with late:                                    # opened after those collectives: sees none
        assert late.active
    assert not late.active and late.records == [] and late.sent_bytes == 0

    a, b = CommCounter(), CommCounter()
    a.start()
    comm.all_gather(x, g)                         # a only
    b.start()
    comm.all_reduce(x.clone(), g)                 # both
    a.stop()
    comm.all_to_all(torch.ones(p, 2), g)          # b only
    b.stop()
    comm.all_gather(x, g)                         # neither
    assert _ops(a) == ["all_gather", "all_reduce"], _ops(a)
    assert _ops(b) == ["all_reduce", "all_to_all"], _ops(b)
    ar = 4 * 4 // p * 2 * (p - 1)
    assert a.by_op() == {"all_gather": 4 * p * 4 // p * (p - 1), "all_reduce": ar}
    b_before = (list(b.records), b.by_op(), b.sent_bytes)
    a.reset()
    assert a.records == [] and a.sent_bytes == 0 and a.by_op() == {}
    assert (list(b.records), b.by_op(), b.sent_bytes) == b_before
    with a, b:                                    # nested blocks: both record, then b is reset
        comm.all_reduce(x.clone(), g)
        b.reset()
        with a.window() as w:
            comm.all_reduce(x.clone(), g)
    assert _ops(a) == ["all_reduce", "all_reduce"] and len(w) == 1 and _ops(b) == ["all_reduce"]
    with pytest.raises(RuntimeError, match="already recording"):
        with a:
            a.start()
    # process-wide, not per thread: a collective issued on another thread is recorded too
    with CommCounter() as c:
        t = threading.Thread(target=comm.all_reduce, args=(x.clone(), g))
        t.start()
        t.join()
    assert _ops(c) == ["all_reduce"]
    return True


def test_counters_record_only_while_active_and_independently():
    run_ranks(_counters, 2)


class _Work:
    """A finished collective that remembers the timeout each wait was given."""

    def __init__(self):
        self.timeouts = []

    def wait(self, timeout=None):
        self.timeouts.append(timeout)
        return True


def _waited(handle):
    work = handle._work
    handle.wait()
    return work.timeouts[-1]


def test_collective_timeout_is_scoped_and_restores_the_previous_bound():
    issued = lambda: comm.Handle(_Work(), torch.zeros(1))          # noqa: E731
    assert _waited(issued()) is None
    with comm.collective_timeout(20):
        assert _waited(issued()) == datetime.timedelta(seconds=20)
        with comm.collective_timeout(5):
            inner = issued()
        assert _waited(issued()) == datetime.timedelta(seconds=20)
        assert _waited(inner) == datetime.timedelta(seconds=5)     # the bound it was issued under
        with comm.collective_timeout(None):
            assert _waited(issued()) is None
        with pytest.raises(KeyError):
            with comm.collective_timeout(1):
                raise KeyError
        assert _waited(issued()) == datetime.timedelta(seconds=20)
    assert _waited(issued()) is None
