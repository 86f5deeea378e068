"""A real corpus that ships with every Python: byte-level tokens of the standard library's sources."""
from __future__ import annotations

import os
import sysconfig

import torch

__all__ = ["stdlib_bytes"]


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of the standard library's ``.py`` files (sorted walk, no
    site-packages), as int64 tokens in ``[0, 256)``. The same bytes on every rank."""
    root, buf = sysconfig.get_paths()["stdlib"], bytearray()
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    buf += fh.read()
            if len(buf) >= limit:
                return torch.tensor(list(buf[:limit]), dtype=torch.int64)
    return torch.tensor(list(buf), dtype=torch.int64)
