"""The two shape rules of a phantom (or TP) layer on a group of ``p`` ranks, as error messages:

* every width split over the group is divisible by ``p`` (each rank holds ``n/p`` neurons);
* the ghost dimension is an integer ``1 <= k``, and at most ``n_in/p`` where ``p > 1``: at
  ``k = n_in/p`` the layer is already exact (``docs/concepts.md``), so a larger ``k`` adds
  parameters and traffic for nothing.

Each function returns ``None`` when the rule holds and otherwise the message, which names the
argument, its value and the fix; callers raise it (the layers first agree across the group on
whether any rank failed, :mod:`phantom_plugin.checks`). Torch-free: the cost model and
``phantom-plan`` use them too.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["divisibility_error", "ghost_dim_error"]


def divisibility_error(name: str, n: int, p: int, *, by: str = "group size",
                       fix: Optional[str] = None) -> Optional[str]:
    """``None`` when ``p`` divides ``n``, else ``"{name}={n} is not divisible by the {by} {p}; {fix}"``.

    Args:
        name: the argument holding the width (``"in_features"``, ``"--width"``).
        n: the width.
        p: the group size it is split over.
        by: what ``p`` is called where the caller takes it (``"tensor-parallel size"``).
        fix: what to do instead; default: a multiple of ``p``, or a group size that divides ``n``.
    """
    if n % p == 0:
        return None
    fix = fix if fix is not None else f"choose a multiple of {p} or a {by} that divides {n}"
    return f"{name}={n} is not divisible by the {by} {p}; {fix}"


def ghost_dim_error(k, n_in: int, p: int, *, name: str = "ghost_dim", bound: str = "in_features/p",
                    where: Optional[str] = None) -> Optional[str]:
    """``None`` when ``k`` is an integer ``>= 1`` and, for ``p > 1``, ``k <= n_in // p``; else the message.

    Args:
        k: the ghost dimension asked for (checked to be an ``int``, not a ``bool``).
        n_in: the input width that bounds it (the narrowest one where several layers share ``k``).
        p: the group size.
        name: the argument's name (``"ghost_dim"``, ``"ghost_neurons"``).
        bound: how the bound reads (``"in_features/p"``, ``"min(hidden_size, ffn_hidden_size)/p"``).
        where: which layer gives the bound, if that needs saying; it goes in parentheses with the
            arithmetic (``"ghost_neurons=7 exceeds ... (largest: 'fc2', 12/2 = 6)"``).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        return f"{name} must be an integer >= 1, got {k!r}"
    if p == 1 or k <= n_in // p:
        return None
    ratio = f"{n_in}/{p} = {n_in // p}"
    told = f"{bound} ({where}, {ratio})" if where else f"{bound} = {ratio}"
    return (f"{name}={k} exceeds {told}; lower {name} (at {n_in // p} the layer is already exact: "
            "a larger k adds nothing)")
