"""Block algebra between a dense weight and phantom parameters (no communication).

``docs/concepts.md``: the dense equivalent of a phantom layer has blocks ``W[i,i] = L_i`` and
``W[i,j] = D_ij C_j``; the best phantom approximation of a given ``W`` keeps ``L_i = W[i,i]`` and
takes a rank-``k`` truncated SVD of each block column's stacked off-diagonal blocks
(Eckart-Young), exact once ``k >= n_in/p``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["dense_from_blocks", "svd_block_column", "split_decompressor", "decompressor_from_factors",
           "blocks_from_dense"]


def split_decompressor(decomp: torch.Tensor, p: int, rank: int) -> dict[int, torch.Tensor]:
    """``[n_out/p, (p-1)k]`` of rank ``rank`` -> ``{j: D_rank,j [n_out/p, k]}`` for ``j != rank``."""
    others = [j for j in range(p) if j != rank]
    return dict(zip(others, decomp.chunk(p - 1, dim=1))) if p > 1 else {}


def dense_from_blocks(local: Sequence[torch.Tensor], compressor: Sequence[Optional[torch.Tensor]],
                      decompressor: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """Assemble ``W [n_out, n_in]`` from every rank's ``L_i``, ``C_i`` and ``[D_ij]`` (lists indexed by rank)."""
    p = len(local)
    rows = []
    for i in range(p):
        d = split_decompressor(decompressor[i], p, i) if p > 1 else {}
        rows.append(torch.cat([local[i] if j == i else d[j] @ compressor[j] for j in range(p)], dim=1))
    return torch.cat(rows, dim=0)


def svd_block_column(weight: torch.Tensor, p: int, k: int, col: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``k`` factorisation of block column ``col`` of ``weight [n_out, n_in]`` without its diagonal block.

    Returns ``C_col [k, n_in/p]``, ``F [(p-1) n_out/p, k]`` whose row block for rank ``i`` (in
    order of ``i != col``) is ``D_i,col``, and the squared Frobenius norm of what the truncation
    dropped (a 0-d tensor). Computed in float64 on ``weight``'s device; only the block column is
    cast (``[n_out, n_in/p]``, not the whole weight).
    """
    n_out, n_in = weight.shape
    mo, mi = n_out // p, n_in // p
    column = weight.detach()[:, col * mi:(col + 1) * mi]                        # [n_out, mi]
    stacked = torch.cat([column[:col * mo], column[(col + 1) * mo:]], dim=0).to(torch.float64)  # [(p-1)mo, mi]
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    kk = min(k, s.numel())
    comp = torch.zeros(k, mi, dtype=torch.float64, device=stacked.device)
    fac = torch.zeros(stacked.shape[0], k, dtype=torch.float64, device=stacked.device)
    comp[:kk] = vh[:kk]
    fac[:, :kk] = u[:, :kk] * s[:kk]
    return comp, fac, (s[kk:] ** 2).sum()


def decompressor_from_factors(factors: Sequence[torch.Tensor], p: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``[D_rank,j for j != rank]`` ``[n_out/p, (p-1)k]`` from every block column's
    ``F`` (``factors[j]``, the second result of :func:`svd_block_column` for column ``j``; the
    entry ``factors[rank]`` is not read)."""
    parts = []
    for j in range(p):
        if j == rank:
            continue
        mo = factors[j].shape[0] // (p - 1)
        slot = rank if rank < j else rank - 1                      # rank's row block in column j
        parts.append(factors[j][slot * mo:(slot + 1) * mo])
    return torch.cat(parts, dim=1)


def blocks_from_dense(weight: torch.Tensor, bias: Optional[torch.Tensor], p: int, k: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's parameters of ``PhantomLinear.from_dense(weight, bias, ghost_dim=k)`` in one process.

    The same factorisation (:func:`svd_block_column` per block column, float64) and assembly
    (:func:`decompressor_from_factors`) as the distributed ``from_dense``, cast to ``weight``'s
    dtype; keys as :func:`phantom_plugin.init.master_blocks` (``"bias"`` only with a bias). For
    single-process references and studies.
    """
    n_out, n_in = weight.shape
    mo, mi = n_out // p, n_in // p
    w = weight.detach()
    cols = [svd_block_column(w, p, k, j)[:2] for j in range(p)] if p > 1 else []
    out = []
    for r in range(p):
        blocks = {"local_weight": w[r * mo:(r + 1) * mo, r * mi:(r + 1) * mi].clone()}
        if bias is not None:
            blocks["bias"] = bias.detach()[r * mo:(r + 1) * mo].clone()
        if p > 1:
            blocks["compressor"] = cols[r][0].to(w.dtype)
            blocks["decompressor"] = decompressor_from_factors([f for _, f in cols], p, r).to(w.dtype)
        out.append(blocks)
    return out
