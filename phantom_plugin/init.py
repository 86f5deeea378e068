"""Deterministic initialisation of phantom parameters from a seed.

Every block is sliced out of a *master* tensor drawn from the seed alone, so each rank computes
its own shard without communication and a single process can rebuild the whole group's
parameters (:func:`master_blocks`) to check a parallel run against.

Fan-in convention (``U(-b, b)`` as ``torch.nn.Linear``, variance ``b^2/3``):

* local block ``L_i``: ``b = 1/sqrt(n_in)``, the dense layer's own bound; ``L_i`` is the
  diagonal block ``W0[i, i]`` of the dense master ``W0 [n_out, n_in]``;
* compressor ``C_i``: ``b = 1/sqrt(n_in/p)``, fan-in of a ghost is the ``n_in/p`` local inputs;
* decompressor ``D_ij``: ``b = sqrt(3/(p*k))``, chosen so the ``(p-1)k`` remote ghosts add
  ``(p-1)/p`` of the output variance, as the off-diagonal blocks of a dense layer do;
* bias: ``b = 1/sqrt(n_in)``.

The master ``W0`` is drawn in chunks of 128 rows with per-chunk seeds, so a rank draws only the
chunks covering its rows, and the values do not depend on ``p``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["dense_master", "dense_bias", "local_block", "compressor_block", "decompressor_block", "bias_block", "master_blocks"]

_CHUNK = 128


def _gen(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 7919) % (2 ** 63))


def _uniform(gen: torch.Generator, shape, bound: float) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


def local_block(seed: int, n_in: int, n_out: int, p: int, rank: int) -> torch.Tensor:
    """``L_rank = W0[rank, rank]`` ``[n_out/p, n_in/p]``, float32 on CPU."""
    bound = 1 / math.sqrt(n_in)
    r0, r1 = rank * n_out // p, (rank + 1) * n_out // p
    c0, c1 = rank * n_in // p, (rank + 1) * n_in // p
    rows = []
    for chunk in range(r0 // _CHUNK, (r1 - 1) // _CHUNK + 1):
        lo, hi = chunk * _CHUNK, min((chunk + 1) * _CHUNK, n_out)
        block = _uniform(_gen(seed, 1000 + chunk), (hi - lo, n_in), bound)
        rows.append(block[max(r0, lo) - lo:min(r1, hi) - lo, c0:c1])
    return torch.cat(rows, dim=0)


def dense_master(seed: int, n_in: int, n_out: int) -> torch.Tensor:
    """The dense master ``W0 [n_out, n_in]`` whose diagonal blocks are the ``L_i`` (float32, CPU).

    A TP baseline initialised from it with the same seed shares every phantom local block.
    """
    return local_block(seed, n_in, n_out, 1, 0)


def dense_bias(seed: int, n_in: int, n_out: int) -> torch.Tensor:
    """The dense master bias ``[n_out]`` whose slices are the ``b_i``."""
    return bias_block(seed, n_in, n_out, 1, 0)


def compressor_block(seed: int, n_in: int, k: int, p: int, rank: int) -> torch.Tensor:
    """``C_rank [k, n_in/p]``: columns of a master ``[k, n_in]``."""
    c0, c1 = rank * n_in // p, (rank + 1) * n_in // p
    return _uniform(_gen(seed, 1), (k, n_in), 1 / math.sqrt(n_in / p))[:, c0:c1].contiguous()


def decompressor_block(seed: int, n_out: int, k: int, p: int, rank: int) -> torch.Tensor:
    """``[D_rank,j for j != rank]`` side by side, ``[n_out/p, (p-1)k]``, from a master ``[n_out, p, k]``."""
    r0, r1 = rank * n_out // p, (rank + 1) * n_out // p
    master = _uniform(_gen(seed, 2), (n_out, p, k), math.sqrt(3 / (p * k)))[r0:r1]
    others = torch.cat([master[:, :rank], master[:, rank + 1:]], dim=1)  # [n_out/p, p-1, k]
    return others.reshape(r1 - r0, -1).contiguous()


def bias_block(seed: int, n_in: int, n_out: int, p: int, rank: int) -> torch.Tensor:
    """``b_rank [n_out/p]``."""
    r0, r1 = rank * n_out // p, (rank + 1) * n_out // p
    return _uniform(_gen(seed, 3), (n_out,), 1 / math.sqrt(n_in))[r0:r1].clone()


def master_blocks(seed: int, n_in: int, n_out: int, k: int, p: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's initial parameters, for single-process references. ``k`` is ignored at ``p = 1``."""
    out = []
    for r in range(p):
        blocks = {"local_weight": local_block(seed, n_in, n_out, p, r),
                  "bias": bias_block(seed, n_in, n_out, p, r)}
        if p > 1:
            blocks["compressor"] = compressor_block(seed, n_in, k, p, r)
            blocks["decompressor"] = decompressor_block(seed, n_out, k, p, r)
        out.append(blocks)
    return out
