"""Argument checks that fail on every rank before any data collective can hang.

:func:`resolve_group` turns a ``group`` argument into ``(p, rank)`` or raises a clear error;
:func:`agree_across_group` runs one small all-gather of integers so that every rank raises
the same error when any rank's arguments are invalid or differ from the others'.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import comm

__all__ = ["resolve_group", "agree_across_group"]


def resolve_group(group: Optional[dist.ProcessGroup], who: str) -> tuple[int, int]:
    """``(p, rank)`` of this process in ``group``.

    ``group=None`` means the default (world) group when torch.distributed is initialized, and a
    single-process layer (``p = 1``) when it is not.
    """
    if group is None:
        return comm.group_size(None), comm.group_rank(None)
    if not dist.is_initialized():
        raise RuntimeError(
            f"{who}: `group` was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) first, or pass group=None for a "
            "single-process layer")
    try:
        p, rank = dist.get_world_size(group), dist.get_rank(group)
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(f"{who}: `group` is not a usable process group ({e}); create it with "
                           "torch.distributed.new_group(ranks) on every rank") from e
    if rank < 0:
        raise RuntimeError(f"{who}: this rank ({dist.get_rank()}) is not a member of `group`; "
                           "build the layer only on the group's ranks")
    return p, rank


def agree_across_group(group: Optional[dist.ProcessGroup], p: int, who: str,
                       fields: dict[str, int], local_error: Optional[str],
                       adopt: tuple[str, ...] = ()) -> dict[str, int]:
    """Raise on every rank if any rank had ``local_error`` or ranks disagree on ``fields``.

    Fields named in ``adopt`` may differ: every rank takes the value of the group's first rank.
    Returns the agreed ``fields``. Costs one all-gather of ``len(fields) + 1`` int64 values
    (skipped when ``p == 1``, where the local error, if any, is raised directly).
    """
    if p == 1:
        if local_error:
            raise ValueError(f"{who}: {local_error}")
        return dict(fields)
    names = list(fields)
    mine = torch.tensor([0 if local_error is None else 1] + [int(fields[n]) for n in names],
                        dtype=torch.int64, device=comm.collective_device(group))
    table = comm.all_gather(mine, group, tag="setup_check").cpu()         # [p, 1 + fields]
    if local_error:
        raise ValueError(f"{who}: {local_error}")
    bad = [r for r in range(p) if table[r, 0]]
    if bad:
        raise ValueError(f"{who}: rank(s) {bad} of the group rejected their arguments (see their "
                         "error); every rank must pass the same valid arguments")
    for c, name in enumerate(names, start=1):
        values = table[:, c].tolist()
        if len(set(values)) > 1 and name not in adopt:
            hint = {"seed": " (explicit seeds must match; seed=None takes the first rank's draw)",
                    "seed_given": " (pass seed= on every rank of the group, or seed=None on every rank)"}
            raise ValueError(f"{who}: ranks disagree on `{name}` (per rank: {values}); pass the "
                             f"same value on every rank of the group{hint.get(name, '')}")
    return {name: int(table[0, c]) for c, name in enumerate(names, start=1)}
