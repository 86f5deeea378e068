"""Autograd operators of phantom parallelism (``docs/concepts.md``, "One phantom layer").

Tier two of three: :mod:`comm` holds raw collectives, this module the autograd Functions
(named for where the data goes) and their public lowercase wrappers, :mod:`layers` the modules.
Layers call only the wrappers below.

Each op issues its collectives through :mod:`comm` in eager mode (c10d work handles: byte
counter, routing, timeouts) and through :mod:`traceable` (torch's functional collectives) under
``torch.compile`` or inside :func:`use_functional_collectives`; the wrapper picks the path when
the op runs forward and the backward takes the same one. Both issue a collective before the
local GEMM it overlaps and wait where its result is read.

Shapes use ``*`` for any leading batch dims, ``B`` for their product, ``p`` for the group size,
``k`` for the ghost dimension. Rank ``i`` owns ``x_shard [*, n_in/p]`` and ``y_shard [*, n_out/p]``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from . import comm, traceable

__all__ = ["phantom_linear", "scatter_to_group", "gather_from_group",
           "sequence_to_hidden", "hidden_to_sequence", "use_functional_collectives"]

_FUNCTIONAL_IN_EAGER = False
"""Whether eager calls take the functional-collective path (:func:`use_functional_collectives`)."""


@contextlib.contextmanager
def use_functional_collectives(enabled: bool = True):
    """Issue the phantom ops' collectives through torch's functional collectives in eager mode too.

    Under ``torch.compile`` the ops always do (:mod:`.traceable`; a c10d work handle cannot be
    traced). In eager mode they use :mod:`.comm` (byte counter, :func:`comm.use_backend`
    routing, :func:`comm.collective_timeout`, device moves) unless this block says otherwise;
    the two paths compute the same values (``tests/test_compile.py``) and ran at the same speed
    (``benchmarks/funcol_eager_check.py``). The path is chosen when an op runs forward, and its
    backward takes the same one. Process-wide while the block lasts; blocks nest.
    """
    global _FUNCTIONAL_IN_EAGER
    previous = _FUNCTIONAL_IN_EAGER
    _FUNCTIONAL_IN_EAGER = bool(enabled)
    try:
        yield
    finally:
        _FUNCTIONAL_IN_EAGER = previous


def _traced() -> bool:
    """Whether this call takes the functional path (always under torch.compile)."""
    return torch.compiler.is_compiling() or _FUNCTIONAL_IN_EAGER


def _coll(traced: bool):
    """The raw-collective module of a path (looked up per call, so tests may patch :mod:`comm`)."""
    return traceable if traced else comm


def _remote_index(p: int, rank: int, device) -> torch.Tensor:
    """Ranks other than ``rank``, in order: ``[p-1]`` int64 on ``device``."""
    idx = torch.arange(p - 1, device=device)
    return idx + (idx >= rank).to(idx.dtype)


def _remote_ghosts(gathered: torch.Tensor, rank: int) -> torch.Tensor:
    """``G_remote [B, (p-1)k]`` of ``gathered [p, B, k]``: the other ranks' ghosts side by side.

    With two ranks it is the other rank's slot, a view (no index, no copy); otherwise one
    ``index_select``.
    """
    p, B = gathered.shape[0], gathered.shape[1]
    if p == 2:
        return gathered[1 - rank]                                        # [B, k], contiguous
    idx = _remote_index(p, rank, gathered.device)
    return gathered.transpose(0, 1).index_select(1, idx).reshape(B, -1)


def _no_autocast(device: torch.device):
    """Autocast off for ``device``'s type inside the Function (inputs are already cast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class _PhantomLinear(torch.autograd.Function):
    """``y_i = L_i x_i + sum_{j != i} D_ij G_j + b_i`` with ``G = all_gather(C_i x_i)``.

    Forward:  ghosts ``g = x C^T [B, k]``; async **all-gather** of ``g`` -> ``G [p, B, k]`` runs while
              the local GEMM ``x L^T [B, n_out/p]`` computes; then one decompression GEMM
              ``G_remote [B, (p-1)k] @ D^T`` with ``D [n_out/p, (p-1)k]`` (remote ranks in order;
              ``G_remote`` is the other slot of ``G`` with two ranks, else one ``index_select``).
    Backward: ``dG_j = dy D_ij [B, k]`` for ``j != i`` written straight into the send buffer
              ``[p, B, k]`` (own slot zero); async **reduce-scatter** (sum) -> ``dg [B, k]`` runs while
              ``dL = dy^T x``, ``dD = dy^T G_remote``, ``db`` and the local part of ``dx = dy L``
              compute; then ``dC = dg^T x`` and ``dx += dg C``.
    Communication per call: ``p*k*B`` values gathered forward, ``p*k*B`` reduce-scattered backward.
    All tensors arrive in one dtype (:func:`phantom_linear` casts them under autocast).
    """

    @staticmethod
    def forward(ctx, x, local_w, comp_w, decomp_w, bias, group, rank, traced):
        with _no_autocast(x.device):
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])                              # [B, n_in/p]
            ghosts = x2 @ comp_w.t()                                     # [B, k]
            pending = _coll(traced).all_gather(ghosts, group, async_op=True, tag="ghosts_fwd")
            y = x2 @ local_w.t() if bias is None else torch.addmm(bias, x2, local_w.t())  # [B, n_out/p]
            gathered = pending.wait()                                    # [p, B, k]
            p = gathered.shape[0]
            remote = _remote_ghosts(gathered, rank)                      # [B, (p-1)k]
            y.addmm_(remote, decomp_w.t())
        ctx.save_for_backward(x2, remote, local_w, comp_w, decomp_w)
        ctx.group, ctx.rank, ctx.p, ctx.has_bias, ctx.lead = group, rank, p, bias is not None, lead
        ctx.traced = traced
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        with _no_autocast(dy.device):
            return _PhantomLinear._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x2, remote, local_w, comp_w, decomp_w = ctx.saved_tensors
        p, k, r = ctx.p, comp_w.shape[0], ctx.rank
        dy2 = dy.reshape(-1, dy.shape[-1])                               # [B, n_out/p]
        B, mo = dy2.shape
        d_all = dy2.new_empty((p, B, k))                                 # the send buffer
        d_all[r].zero_()
        decomp_3 = decomp_w.view(mo, p - 1, k).transpose(0, 1)           # [p-1, n_out/p, k]
        for lo, hi, src in ((0, r, 0), (r + 1, p, r)):                   # slots before / after own
            if hi - lo == 1:                                             # dG_j = dy D_ij, one plain GEMM
                torch.mm(dy2, decomp_3[src], out=d_all[lo])
            elif hi > lo:                                                # several slots: one batched GEMM
                torch.matmul(dy2.expand(hi - lo, B, mo), decomp_3[src:src + hi - lo], out=d_all[lo:hi])
        pending = _coll(ctx.traced).reduce_scatter(d_all, ctx.group, async_op=True, tag="ghosts_bwd")
        need_x, need_l, need_c, need_d, need_b = ctx.needs_input_grad[:5]
        d_local = dy2.t() @ x2 if need_l else None                       # [n_out/p, n_in/p]
        d_decomp = None                                                  # [n_out/p, (p-1)k]
        if need_d:
            # CPU: (remote^T dy)^T, which MKL runs ~1.6x faster; CUDA: the plain product, whose
            # contiguous result autograd accumulates without a copy
            d_decomp = (remote.t() @ dy2).t() if dy2.device.type == "cpu" else dy2.t() @ remote
        d_bias = dy2.sum(0) if ctx.has_bias and need_b else None
        dx = dy2 @ local_w if need_x else None                           # [B, n_in/p]
        dg = pending.wait()                                              # [B, k]
        d_comp = dg.t() @ x2 if need_c else None                         # [k, n_in/p]
        if need_x:
            dx.addmm_(dg, comp_w)
            dx = dx.reshape(*ctx.lead, dx.shape[-1])
        return dx, d_local, d_comp, d_decomp, d_bias, None, None, None


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for ``x``'s device when autocast is on there (``nn.Linear``'s cast)."""
    kind = x.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def phantom_linear(x_shard: torch.Tensor, local_weight: torch.Tensor, compressor: torch.Tensor,
                   decompressor: torch.Tensor, bias: Optional[torch.Tensor],
                   group: Optional[dist.ProcessGroup], rank: int) -> torch.Tensor:
    """Phantom linear map on rank ``rank`` of ``group``.

    forward: all-gather of ghosts ``[B, k]``; backward: reduce-scatter of ghost grads ``[p, B, k]``.

    Args:
        x_shard: ``[*, n_in/p]``.
        local_weight: ``L_i [n_out/p, n_in/p]``. compressor: ``C_i [k, n_in/p]``.
        decompressor: ``[D_ij for j != i]`` side by side, ``[n_out/p, (p-1)k]``.
        bias: ``b_i [n_out/p]`` or None.
    Returns ``y_shard [*, n_out/p]``. With a group of one rank this is ``x L^T + b``.

    Under ``torch.autocast`` it behaves as ``nn.Linear``: the input and every weight are cast to
    the autocast dtype (the casts are recorded, so parameter grads arrive in the parameters'
    dtype), the GEMMs and the ghost exchange run in that dtype and so does the output.
    """
    if comm.group_size(group) == 1:
        return torch.nn.functional.linear(x_shard, local_weight, bias)
    dtype = _autocast_dtype(x_shard)
    if dtype is not None:
        def cast(t):
            return t if t is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype)
        x_shard, local_weight, compressor, decompressor, bias = (
            cast(t) for t in (x_shard, local_weight, compressor, decompressor, bias))
    return _PhantomLinear.apply(x_shard, local_weight, compressor, decompressor, bias, group, rank,
                                _traced())


# --- region ops at the edges of a phantom block ---------------------------------------------

def _gather_last(x: torch.Tensor, group, tag: str, traced: bool) -> torch.Tensor:
    gathered = _coll(traced).all_gather(x, group, tag=tag)               # [p, *, m]
    return torch.cat(gathered.unbind(0), dim=-1)                         # [*, p*m]


def _own_last(x: torch.Tensor, group, copy: bool = True) -> torch.Tensor:
    """This rank's slice of the last dim, ``[*, n] -> [*, n/p]``; ``copy=False``: a strided view
    (for a gradient: the GEMMs that read it take the row stride). A forward output stays a copy,
    so that later in-place ops on it do not meet autograd's view-of-input rules."""
    p, r = comm.group_size(group), comm.group_rank(group)
    m = x.shape[-1] // p
    own = x[..., r * m:(r + 1) * m]
    return own.contiguous() if copy else own


class _ScatterToGroup(torch.autograd.Function):
    """Forward: take own slice ``[*, n] -> [*, n/p]`` (no communication).
    Backward: all-gather of the slices' grads ``[*, n/p] -> [*, n]``."""

    @staticmethod
    def forward(ctx, x, group, traced):
        ctx.group, ctx.traced = group, traced
        return _own_last(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _gather_last(dy, ctx.group, "scatter_bwd", ctx.traced), None, None


class _GatherFromGroup(torch.autograd.Function):
    """Forward: all-gather ``[*, n/p] -> [*, n]``. Backward: take own slice of the grad (no communication)."""

    @staticmethod
    def forward(ctx, x, group, traced):
        ctx.group = group
        return _gather_last(x, group, "gather_fwd", traced)

    @staticmethod
    def backward(ctx, dy):
        return _own_last(dy, ctx.group, copy=False), None, None


def scatter_to_group(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """forward: split the last dim, keep own shard; backward: all-gather. ``[*, n] -> [*, n/p]``."""
    if comm.group_size(group) == 1:
        return x
    return _ScatterToGroup.apply(x, group, _traced())


def gather_from_group(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """forward: all-gather the last dim; backward: keep own shard. ``[*, n/p] -> [*, n]``."""
    if comm.group_size(group) == 1:
        return x
    return _GatherFromGroup.apply(x, group, _traced())


# --- sequence-parallel layout switch (all-to-all) -------------------------------------------

def _seq_to_hidden(x: torch.Tensor, group, tag: str, traced: bool) -> torch.Tensor:
    """``[s/p, *, h]`` (sequence shard) -> ``[s, *, h/p]`` (hidden shard)."""
    p = comm.group_size(group)
    chunks = torch.stack(x.chunk(p, dim=-1), dim=0)                      # [p, s/p, *, h/p]
    recv = _coll(traced).all_to_all(chunks, group, tag=tag)              # [p, s/p, *, h/p]
    return recv.reshape(-1, *recv.shape[2:])                             # [s, *, h/p]


def _hidden_to_seq(x: torch.Tensor, group, tag: str, traced: bool) -> torch.Tensor:
    """``[s, *, h/p]`` (hidden shard) -> ``[s/p, *, h]`` (sequence shard)."""
    p = comm.group_size(group)
    chunks = x.reshape(p, x.shape[0] // p, *x.shape[1:])                 # [p, s/p, *, h/p]
    recv = _coll(traced).all_to_all(chunks, group, tag=tag)              # [p, s/p, *, h/p]
    return torch.cat(recv.unbind(0), dim=-1)                             # [s/p, *, h]


class _SequenceToHidden(torch.autograd.Function):
    """Forward: all-to-all ``[s/p, *, h] -> [s, *, h/p]``. Backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, traced):
        ctx.group, ctx.traced = group, traced
        return _seq_to_hidden(x, group, "seq_to_hidden_fwd", traced)

    @staticmethod
    def backward(ctx, dy):
        return _hidden_to_seq(dy, ctx.group, "seq_to_hidden_bwd", ctx.traced), None, None


class _HiddenToSequence(torch.autograd.Function):
    """Forward: all-to-all ``[s, *, h/p] -> [s/p, *, h]``. Backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, traced):
        ctx.group, ctx.traced = group, traced
        return _hidden_to_seq(x, group, "hidden_to_seq_fwd", traced)

    @staticmethod
    def backward(ctx, dy):
        return _seq_to_hidden(dy, ctx.group, "hidden_to_seq_bwd", ctx.traced), None, None


def sequence_to_hidden(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """forward: all-to-all sequence shard -> hidden shard; backward: the reverse all-to-all."""
    if comm.group_size(group) == 1:
        return x
    return _SequenceToHidden.apply(x, group, _traced())


def hidden_to_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """forward: all-to-all hidden shard -> sequence shard; backward: the reverse all-to-all."""
    if comm.group_size(group) == 1:
        return x
    return _HiddenToSequence.apply(x, group, _traced())
