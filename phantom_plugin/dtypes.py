"""The floating-point dtypes the plugin runs in: one table, by name, read by every other part.

Each :class:`DType` names a dtype two ways (the short name the command lines and configs take,
``"bf16"``, and torch's, ``"bfloat16"``) and gives its size in bytes. Torch-free: the cost model
and ``phantom-plan`` price bytes from :data:`DTYPES` without importing torch; the runtime gets the
``torch.dtype`` of an entry from :func:`torch_dtype` (which imports torch) and the entry of a
``torch.dtype`` from :func:`of_torch` (which does not: it matches the dtype's name).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["DType", "DTYPES", "names", "lookup", "torch_dtype", "of_torch"]


@dataclasses.dataclass(frozen=True)
class DType:
    """One dtype: ``name`` (short, ``"bf16"``), ``torch_name`` (``torch.<torch_name>``), ``bytes`` per
    element, and ``code``, a small integer that stands for it where ranks compare their arguments
    (:func:`phantom_plugin.checks.agree_across_group`)."""
    name: str
    torch_name: str
    bytes: int
    code: int


DTYPES = {d.name: d for d in (DType("fp32", "float32", 4, 0), DType("bf16", "bfloat16", 2, 2),
                              DType("fp16", "float16", 2, 3), DType("fp64", "float64", 8, 1))}
"""Short name -> :class:`DType`, in the order the command lines list them."""


def names(*, torch_names: bool = False) -> list[str]:
    """The short names of :data:`DTYPES`; with ``torch_names``, torch's names after them."""
    return list(DTYPES) + ([d.torch_name for d in DTYPES.values()] if torch_names else [])


def lookup(name: str, who: str = "dtype") -> DType:
    """The entry of ``name``, short (``"bf16"``) or torch's (``"bfloat16"``, ``"torch.bfloat16"``).

    Raises ``ValueError`` naming ``who`` (the argument or flag) and the names it takes.
    """
    key = str(name).removeprefix("torch.")
    for d in DTYPES.values():
        if key in (d.name, d.torch_name):
            return d
    raise ValueError(f"{who}: unknown dtype {name!r}; use one of {', '.join(names(torch_names=True))}")


def torch_dtype(name: str, who: str = "dtype"):
    """The ``torch.dtype`` of ``name`` (see :func:`lookup`). Imports torch."""
    import torch
    return getattr(torch, lookup(name, who).torch_name)


def of_torch(dtype) -> Optional[DType]:
    """The entry of a ``torch.dtype`` (``None`` when the plugin does not run in it), found by the
    dtype's name, so without importing torch."""
    text = str(dtype)
    return next((d for d in DTYPES.values() if text == f"torch.{d.torch_name}"), None)
