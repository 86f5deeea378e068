"""The opt-in byte counter: :class:`CommCounter` records each collective :mod:`.comm` issues while
it is active, as a :class:`CommRecord` (op, algorithm, group size, payload and the bytes this
rank sends). Nothing is active by default. :mod:`.comm` asks :func:`active_counters` once per
collective and builds a record only when one is active.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator

import torch

__all__ = ["CommRecord", "CommCounter", "active_counters"]


@dataclasses.dataclass(frozen=True)
class CommRecord:
    """One collective as issued by this rank.

    ``payload_bytes`` is the size of the gathered / reduced tensor (the whole ``p``-chunk
    buffer); ``sent_bytes`` is what this rank puts on the wire under ``algorithm``.
    """
    op: str
    algorithm: str
    group_size: int
    numel: int
    dtype: torch.dtype
    payload_bytes: int
    sent_bytes: int
    tag: str = ""


_ACTIVE: tuple["CommCounter", ...] = ()
"""The counters recording now (the registry :meth:`CommCounter.start` / :meth:`~CommCounter.stop`
edit); replaced, never mutated, so a collective reads it without the lock."""
_ACTIVE_LOCK = threading.Lock()


class CommCounter:
    """Records every collective issued while it is active; a context manager.

    ``with CommCounter() as counter:`` activates it for the block: each collective this module
    issues in the meantime (and, inside :func:`intercept_torch_collectives`, each third-party
    ``torch.distributed`` one) adds a :class:`CommRecord` to it. Several counters may be active at
    once, nested or overlapping: each gets every record, and each one's :meth:`reset` touches only
    itself. Activation is process-wide, not per thread or per context, because autograd runs the
    backward of CUDA tensors on its own device threads and their collectives must be counted too:
    a counter active in one thread also records another thread's collectives. An owner that lives
    across calls (the DeepSpeed monitor) uses :meth:`start` / :meth:`stop` instead of a block.
    Leaving the block stops recording; the totals stay readable.

    Totals (:attr:`sent_bytes`, :meth:`by_op`) cover every record since the last :meth:`reset`.
    The record list keeps at most ``max_records`` entries (the oldest half is dropped when it
    overflows), so a long training run does not grow it without bound; :meth:`window` still
    returns every record of its block unless the block alone overflows the cap. Adding is not
    locked: the threads that record at once (a backward's device threads) run while the thread
    that started them waits.
    """

    def __init__(self, max_records: int = 100_000) -> None:
        self.records: list[CommRecord] = []
        self.max_records = max_records
        self._dropped = 0
        self._bytes_by_op: dict[str, int] = {}

    # --- activation ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether collectives are being recorded into this counter now."""
        return self in _ACTIVE

    def start(self) -> "CommCounter":
        """Record every collective from now on, until :meth:`stop`; returns the counter."""
        global _ACTIVE
        with _ACTIVE_LOCK:
            if any(c is self for c in _ACTIVE):
                raise RuntimeError("CommCounter.start: this counter is already recording; stop() "
                                   "it first, or open a second CommCounter for the nested block")
            _ACTIVE = _ACTIVE + (self,)
        return self

    def stop(self) -> None:
        """Stop recording into this counter (no-op when it is not recording); totals are kept."""
        global _ACTIVE
        with _ACTIVE_LOCK:
            _ACTIVE = tuple(c for c in _ACTIVE if c is not self)

    def __enter__(self) -> "CommCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- records and totals ----------------------------------------------------------------

    def add(self, record: CommRecord) -> None:
        """Add one record (what an active counter is given for each collective)."""
        self.records.append(record)
        self._bytes_by_op[record.op] = self._bytes_by_op.get(record.op, 0) + record.sent_bytes
        if len(self.records) > self.max_records:
            drop = len(self.records) // 2
            del self.records[:drop]
            self._dropped += drop

    def reset(self) -> None:
        """Drop the records and zero the totals (of this counter only)."""
        self._dropped += len(self.records)
        self.records.clear()
        self._bytes_by_op.clear()

    @property
    def sent_bytes(self) -> int:
        """Bytes this rank sent since the last reset."""
        return sum(self._bytes_by_op.values())

    def by_op(self) -> dict[str, int]:
        """Bytes sent per op name since the last reset."""
        return dict(self._bytes_by_op)

    @contextlib.contextmanager
    def window(self) -> Iterator[list[CommRecord]]:
        """Collect the records this counter gets inside the ``with`` block into the yielded list."""
        start = self._dropped + len(self.records)
        out: list[CommRecord] = []
        try:
            yield out
        finally:
            out.extend(self.records[max(0, start - self._dropped):])


def active_counters() -> tuple[CommCounter, ...]:
    """The counters recording now (empty when none is: the common case, one check)."""
    return _ACTIVE
