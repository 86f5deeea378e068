"""The cost model of ``docs/concepts.md`` as code: parameters, MACs, messages and memory.

Everything is per training step (one forward and one backward) for a batch of ``batch``
samples (or tokens). MACs and saved activations are **per rank**; parameters are for the
**whole group** (``params_per_rank`` too). Bytes are what **one rank sends** under the
algorithm each :class:`Message` names: ring all-gather / reduce-scatter send ``(p-1)`` chunks of
``1/p`` of the gathered tensor, a ring all-reduce ``2(p-1)`` chunks (on gloo, which has no reduce-scatter, the plugin runs an
all-to-all plus a local sum: the same ``(p-1)`` chunks). These are the same numbers
:mod:`phantom_plugin.comm` records for the calls the code makes, so tests compare them exactly.

The TP side describes megatron-core's ``ColumnParallelLinear`` -> ``RowParallelLinear`` pairs:
forward all-reduce after each row layer, backward all-reduce of each column layer's input grad
(megatron issues it even for the first layer, whose input needs no grad).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..shapes import divisibility_error

__all__ = ["Message", "Cost", "phantom_linear_cost", "phantom_ffn_cost", "tp_ffn_cost",
           "phantom_mlp_cost", "tp_mlp_cost", "suggest_ghost_dim", "equal_compute_ffn_hidden"]


@dataclasses.dataclass(frozen=True)
class Message:
    """One collective per step on one rank: ``values`` gathered/reduced, ``bytes_sent`` by this rank."""
    op: str
    direction: str          # "fwd" or "bwd"
    algorithm: str
    values: int
    bytes_sent: int


@dataclasses.dataclass(frozen=True)
class Cost:
    params: int                  # whole group
    params_per_rank: int
    macs_fwd: int                # per rank
    macs_bwd: int                # per rank
    activation_values: int       # per rank, tensors saved for backward by the linear maps
    messages: tuple[Message, ...] = ()

    @property
    def macs(self) -> int:
        return self.macs_fwd + self.macs_bwd

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def bytes_sent(self) -> int:
        return sum(m.bytes_sent for m in self.messages)

    def bytes_by(self, direction: str) -> int:
        return sum(m.bytes_sent for m in self.messages if m.direction == direction)

    def forward_only(self) -> "Cost":
        """The same model run forward only (inference): forward MACs and forward messages only."""
        return dataclasses.replace(self, macs_bwd=0, activation_values=0,
                                   messages=tuple(m for m in self.messages if m.direction == "fwd"))

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f.name) + getattr(other, f.name)
                      for f in dataclasses.fields(Cost)))


def _ring(op: str, direction: str, values: int, p: int, elt: int) -> Message:
    chunks = 2 * (p - 1) if op == "all_reduce" else p - 1
    return Message(op, direction, "ring", values, values * elt // p * chunks)


def _check(n: int, p: int, name: str) -> None:
    error = divisibility_error(name, n, p)
    if error:
        raise ValueError(error)


def phantom_linear_cost(n_in: int, n_out: int, *, p: int, k: int, batch: int, dtype_bytes: int = 4,
                        bias: bool = True) -> Cost:
    """One ``PhantomLinear`` (the table of ``docs/concepts.md``)."""
    _check(n_in, p, "n_in"), _check(n_out, p, "n_out")
    mi, mo = n_in // p, n_out // p
    kk = k if p > 1 else 0
    per_rank = mo * mi + kk * mi + (p - 1) * kk * mo + (mo if bias else 0)
    macs = batch * (mo * mi + kk * mi + (p - 1) * kk * mo)
    msgs: tuple[Message, ...] = ()
    if p > 1:
        msgs = (_ring("all_gather", "fwd", p * k * batch, p, dtype_bytes),
                _ring("reduce_scatter", "bwd", p * k * batch, p, dtype_bytes))
    return Cost(per_rank * p, per_rank, macs, 2 * macs, batch * (mi + (p - 1) * kk), msgs)


def _edge(op_fwd: Optional[str], op_bwd: Optional[str], n: int, p: int, batch: int, elt: int) -> Cost:
    msgs = tuple(_ring(op, d, n * batch, p, elt) for op, d in ((op_fwd, "fwd"), (op_bwd, "bwd"))
                 if op and p > 1)
    return Cost(0, 0, 0, 0, 0, msgs)


def phantom_ffn_cost(width: int, depth: int, *, p: int, k: int, batch: int, dtype_bytes: int = 4,
                     bias: bool = True, input_requires_grad: bool = False) -> Cost:
    """``PhantomFFN``: scatter edge, ``depth`` phantom layers, gather edge.

    The output edge all-gathers ``width`` values per sample forward; the input edge all-gathers
    its grad backward only when the input requires grad.
    """
    total = _edge("all_gather", None, width, p, batch, dtype_bytes)
    if input_requires_grad:
        total = total + _edge(None, "all_gather", width, p, batch, dtype_bytes)
    for _ in range(depth):
        total = total + phantom_linear_cost(width, width, p=p, k=k, batch=batch,
                                            dtype_bytes=dtype_bytes, bias=bias)
    return total


def _tp_linear(n_in: int, n_out: int, *, p: int, batch: int, kind: str, elt: int, bias: bool,
               gather_output: bool = False) -> Cost:
    """megatron ``ColumnParallelLinear`` (``kind="column"``) or ``RowParallelLinear``."""
    if kind == "column":
        _check(n_out, p, "n_out")
        per_rank = n_out // p * n_in + (n_out // p if bias else 0)
        macs = batch * n_out // p * n_in
        act = batch * n_in
        msgs = [_ring("all_reduce", "bwd", n_in * batch, p, elt)] if p > 1 else []
        if gather_output and p > 1:
            msgs.append(_ring("all_gather", "fwd", n_out * batch, p, elt))
        return Cost(per_rank * p, per_rank, macs, 2 * macs, act, tuple(msgs))
    _check(n_in, p, "n_in")
    per_rank = n_out * n_in // p + (n_out if bias else 0)
    macs = batch * n_out * n_in // p
    msgs = (_ring("all_reduce", "fwd", n_out * batch, p, elt),) if p > 1 else ()
    # the row bias is replicated: the group holds one copy
    return Cost(n_out * n_in + (n_out if bias else 0), per_rank, macs, 2 * macs, batch * n_in // p, msgs)


def tp_ffn_cost(width: int, depth: int, *, p: int, batch: int, dtype_bytes: int = 4,
                bias: bool = True) -> Cost:
    """Megatron TP FFN: column/row pairs; an odd last layer is a column layer whose output is all-gathered."""
    total = Cost(0, 0, 0, 0, 0)
    for l in range(depth):
        if l % 2 == 0:
            total = total + _tp_linear(width, width, p=p, batch=batch, kind="column", elt=dtype_bytes,
                                       bias=bias, gather_output=(l == depth - 1))
        else:
            total = total + _tp_linear(width, width, p=p, batch=batch, kind="row", elt=dtype_bytes, bias=bias)
    return total


def phantom_mlp_cost(hidden: int, ffn_hidden: int, *, p: int, k: int, tokens: int, gated: bool = False,
                     dtype_bytes: int = 4, bias: bool = True) -> Cost:
    """Transformer MLP in phantom form: split, phantom fc1 (``2*ffn`` outputs when gated), act, phantom fc2, gather.

    Per token: all-gather of ``hidden`` forward (output edge) and backward (input edge), and
    four ghost collectives of ``p*k``.
    """
    fc1_out = 2 * ffn_hidden if gated else ffn_hidden
    return (_edge("all_gather", "all_gather", hidden, p, tokens, dtype_bytes)
            + phantom_linear_cost(hidden, fc1_out, p=p, k=k, batch=tokens, dtype_bytes=dtype_bytes,
                                  bias=bias)
            + phantom_linear_cost(ffn_hidden, hidden, p=p, k=k, batch=tokens, dtype_bytes=dtype_bytes,
                                  bias=bias))


def tp_mlp_cost(hidden: int, ffn_hidden: int, *, p: int, tokens: int, gated: bool = False,
                dtype_bytes: int = 4, bias: bool = True) -> Cost:
    """Megatron TP MLP: column fc1, row fc2; one all-reduce of ``hidden`` forward and one backward."""
    fc1_out = 2 * ffn_hidden if gated else ffn_hidden
    return (_tp_linear(hidden, fc1_out, p=p, batch=tokens, kind="column", elt=dtype_bytes, bias=bias)
            + _tp_linear(ffn_hidden, hidden, p=p, batch=tokens, kind="row", elt=dtype_bytes, bias=bias))


def suggest_ghost_dim(width: int, depth: int, *, p: int, batch: int = 1,
                      param_budget: Optional[float] = None,
                      traffic_budget: Optional[float] = None, multiple_of: int = 1) -> int:
    """Largest ``k <= width/p`` whose phantom FFN stays within the budgets, as fractions of TP's.

    ``param_budget=0.25`` asks for at most a quarter of the TP FFN's parameters;
    ``traffic_budget`` bounds bytes sent per step the same way. Raises if even ``k = 1`` does not fit.
    ``multiple_of``: the largest such ``k`` that is a multiple of it (the largest ``k`` when no
    multiple fits): the ``k``-wide GEMMs run markedly slower at odd ``k`` (measured on CPU:
    ``k = 127`` took 1.67x the step of ``k = 64`` for 1.33x its MACs), and tensor cores want
    multiples of 8.
    """
    if multiple_of < 1:
        raise ValueError(f"suggest_ghost_dim: multiple_of must be >= 1, got {multiple_of}")
    if param_budget is None and traffic_budget is None:
        raise ValueError("suggest_ghost_dim: give param_budget and/or traffic_budget (fractions of TP's)")
    tp = tp_ffn_cost(width, depth, p=p, batch=batch)
    best = 0
    for k in range(1, width // p + 1):
        ph = phantom_ffn_cost(width, depth, p=p, k=k, batch=batch)
        if param_budget is not None and ph.params > param_budget * tp.params:
            break
        if traffic_budget is not None and ph.bytes_sent > traffic_budget * tp.bytes_sent:
            break
        best = k
    if best == 0:
        ph = phantom_ffn_cost(width, depth, p=p, k=1, batch=batch)
        raise ValueError(
            f"suggest_ghost_dim: even ghost_dim=1 needs {ph.params / tp.params:.3f} of TP's parameters "
            f"and {ph.bytes_sent / tp.bytes_sent:.3f} of its traffic; raise the budget or use more ranks")
    return best - best % multiple_of if best >= multiple_of else best


def equal_compute_ffn_hidden(hidden: int, ffn_hidden: int, *, p: int, k: int, gated: bool = False,
                             multiple_of: Optional[int] = None) -> int:
    """The widest phantom MLP whose per-rank MACs do not exceed a TP MLP's (``--match compute``).

    Per token and rank, forward (backward is twice that for both, so the ratio is the same):

    * TP (:func:`tp_mlp_cost`): ``h*f/p`` (fc1) + ``f*h/p`` (fc2) = ``2hf/p``;
    * phantom (:func:`phantom_mlp_cost`) with ``f'`` inner neurons: fc1 ``h -> f'`` has the local
      block ``(f'/p)(h/p)``, the compressor ``k (h/p)`` and ``p-1`` decompressors ``(f'/p) k``; fc2
      ``f' -> h`` has ``(h/p)(f'/p)``, ``k (f'/p)`` and ``(p-1)(h/p) k``: together
      ``2hf'/p^2 + k(h + f')`` (``2f'`` fc1 outputs when ``gated``).

    Returns the largest ``f'`` that is a multiple of ``multiple_of`` (default ``p``: each rank holds
    ``f'/p`` neurons) with phantom MACs ``<=`` TP's at ``ffn_hidden``, found by bisection on
    :func:`phantom_mlp_cost` (its MACs grow with ``f'``). Raises ``ValueError`` when no such
    ``f'`` exists, or when it leaves ``k > min(h, f')/p`` (the ghost rule).
    """
    step = p if multiple_of is None else multiple_of
    if step < 1 or step % p:
        raise ValueError(f"equal_compute_ffn_hidden: multiple_of must be a positive multiple of p={p}, got {step}")
    _check(hidden, p, "hidden"), _check(ffn_hidden, p, "ffn_hidden")
    budget = tp_mlp_cost(hidden, ffn_hidden, p=p, tokens=1, gated=gated).macs

    def macs(f: int) -> int:
        return phantom_mlp_cost(hidden, f, p=p, k=k, tokens=1, gated=gated).macs

    lo, hi = 0, 1                                     # in units of step: macs(lo*step) <= budget < macs(hi*step)
    while macs(hi * step) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if macs(mid * step) <= budget else (lo, mid)
    if lo == 0:
        raise ValueError(
            f"equal compute cannot be met: a phantom MLP with k={k} on p={p} ranks needs more MACs than "
            f"TP's (h={hidden}, ffn={ffn_hidden}) even at the narrowest ffn_hidden_size {step}; lower k, "
            "widen the TP MLP, or compare at equal width")
    f = lo * step
    if p > 1 and k > min(hidden, f) // p:
        raise ValueError(
            f"equal compute gives ffn_hidden_size={f}, too narrow for k={k} ghosts on p={p} ranks "
            f"(k <= min(h, ffn)/p = {min(hidden, f) // p}); lower k or compare at equal width")
    return f
