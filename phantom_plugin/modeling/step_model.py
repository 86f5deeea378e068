"""A step-time model: the work of one training step of a TP or phantom FFN as a list of terms
(GEMMs of exact shapes, pointwise passes, the optimizer, collectives, ranks waiting for each
other, the framework's own cost), and their sum once each term has a measured time.

The terms follow the code, not the paper's idealisation: :mod:`phantom_plugin.ops` for phantom
(ghost, local and decompression GEMMs forward; six GEMMs backward, two of them skipped for the
first layer, whose input needs no grad) and megatron-core's ``ColumnParallelLinear`` /
``RowParallelLinear`` for TP (which computes the input grad of the first layer too). Messages come
from :mod:`phantom_plugin.modeling.counts`, so bytes are the ones the byte counter measures. Times per term
come from :mod:`phantom_plugin.bench.calibrate` (``phantom-plan --calibrate``).

Collectives are priced by an alpha-beta fit per op (:class:`LinkFit`, :func:`fit_alpha_beta`:
latency plus bytes over bandwidth, fitted over a ladder of sizes, timed back to back). Inside a
step a collective costs more: it follows a stretch of compute (its threads asleep, its buffers out
of cache) and makes the ranks meet (one that computed longer, time-sliced by other ranks or
processes, keeps the others waiting); :class:`Wait` measures that extra per collective, after a
step's worth of compute between two collectives. What the terms leave out (autograd, Python,
allocations) is :class:`Framework`, measured as a tiny real step of the same mode, depth and
ranks less its own terms: the same count of autograd nodes and collectives as the real step, so
it carries their fixed costs to it. Overlap enters through :class:`Wait` only: an async
collective (phantom's ghost exchange, megatron's input-grad all-reduce) is measured with the GEMMs
the code runs while it is in flight, so what they hide of it is not counted; otherwise
communication is added to compute. Leaf module: torch-free.
"""
from __future__ import annotations

import collections
import dataclasses
import statistics
from typing import Optional, Union

from .. import dtypes
from . import counts

__all__ = ["Gemm", "Pointwise", "Optimizer", "Collective", "Wait", "Framework", "Term", "step_terms", "predict",
           "LinkFit", "fit_alpha_beta", "ladder"]


@dataclasses.dataclass(frozen=True)
class Gemm:
    """``out [m, n] = A [m, k] @ B [k, n]``; ``a_t`` / ``b_t``: the operand is a transposed view."""
    m: int
    k: int
    n: int
    a_t: bool = False
    b_t: bool = False

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n


@dataclasses.dataclass(frozen=True)
class Pointwise:
    """An elementwise pass over ``[rows, cols]``: ``"act"`` (activation forward and backward),
    ``"bias_grad"`` (sum over rows), ``"bias_add"`` (a bias added by its own pass, as megatron's
    layers do), ``"copy"`` (a tensor copied, as at a phantom block's edges), ``"loss"`` (MSE
    forward and backward)."""
    kind: str
    rows: int
    cols: int
    activation: str = "gelu"


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """One fused Adam step over ``numel`` parameters of this rank."""
    numel: int


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective as :class:`counts.Message` counts it: ``op`` over ``values`` (gathered or
    reduced) on ``p`` ranks, ``bytes_sent`` by this rank."""
    op: str
    values: int
    p: int
    bytes_sent: int


@dataclasses.dataclass(frozen=True)
class Framework:
    """What a real step costs beyond its terms (autograd, Python, allocations, the copies at the
    block's edges, launching collectives): measured as a tiny real step of ``mode`` at this
    ``depth`` and ``p``, less its own terms. Independent of the shapes to first order."""
    mode: str
    depth: int
    p: int


@dataclasses.dataclass(frozen=True)
class Wait:
    """What ``coll`` costs inside a step beyond its :class:`LinkFit` price: run after ``calls``
    back-to-back ``gemm`` s (a step's compute between two collectives), a collective costs more
    than timed back to back (its threads woken, its buffers out of cache, the ranks arriving
    apart: time-slicing, other processes, more ranks than cores). One per collective of the
    step; measured, not derived, of either sign. ``overlap``: the GEMMs the code runs between
    launching the collective (async) and waiting for it, which hide part of it."""
    gemm: Gemm
    calls: int
    coll: Collective
    overlap: tuple = ()

    @property
    def p(self) -> int:
        return self.coll.p


# the tiny model whose real step measures Framework: width TINY_WIDTH_PER_RANK * p, k 1, batch TINY_BATCH
TINY_WIDTH_PER_RANK, TINY_BATCH = 16, 2

Term = Union[Gemm, Pointwise, Optimizer, Collective, Wait, Framework]


def _phantom_layer(b: int, mi: int, mo: int, k: int, p: int, first: bool) -> list[Term]:
    if p == 1:
        fwd = [Gemm(b, mi, mo, b_t=True)]
        return fwd + [Gemm(mo, b, mi, a_t=True)] + ([] if first else [Gemm(b, mo, mi)])
    r = (p - 1) * k
    terms = [Gemm(b, mi, k, b_t=True), Gemm(b, mi, mo, b_t=True), Gemm(b, r, mo, b_t=True),   # forward
             Gemm(b, mo, r), Gemm(mo, b, mi, a_t=True), Gemm(r, b, mo, a_t=True), Gemm(k, b, mi, a_t=True)]
    if not first:
        terms += [Gemm(b, mo, mi), Gemm(b, k, mi)]                      # dx = dy L + dg C
    return terms


def step_terms(mode: str, width: int, depth: int, *, p: int, batch: int, k: int = 0,
               activation: str = "gelu", dtype: str = "fp32", framework: bool = True) -> collections.Counter:
    """The terms of one training step on one rank, with multiplicities (``Counter[Term, int]``);
    ``framework=False`` leaves out the :class:`Framework` term."""
    if mode not in ("tp", "phantom"):
        raise ValueError(f"step_terms: mode must be 'tp' or 'phantom', got {mode!r}")
    elt = dtypes.lookup(dtype, "step_terms: dtype").bytes
    n, b, m = width, batch, width // p
    terms: collections.Counter = collections.Counter()
    overlaps: list = []          # per message of the cost model, in its order: GEMMs run while it is in flight
    if mode == "phantom":
        c = counts.phantom_ffn_cost(width, depth, p=p, k=k, batch=batch, dtype_bytes=elt)
        if p > 1:                # the block's edges: own slice of the input, concatenated output
            terms.update([Pointwise("copy", b, m), Pointwise("copy", b, n)])
            overlaps.append(())  # the output all-gather, synchronous
        for l in range(depth):
            terms.update(_phantom_layer(b, m, m, k, p, first=l == 0))
            # ops._PhantomLinear: the ghost all-gather runs under the local GEMM, the ghost-grad
            # reduce-scatter under dL, dD and the local part of dx
            overlaps += [(Gemm(b, m, m, b_t=True),),
                         (Gemm(m, b, m, a_t=True), Gemm((p - 1) * k, b, m, a_t=True)) + (() if l == 0 else (Gemm(b, m, m),))]
            terms[Pointwise("bias_grad", b, m)] += 1
            if l < depth - 1:
                terms[Pointwise("act", b, m, activation)] += 1
    else:
        c = counts.tp_ffn_cost(width, depth, p=p, batch=batch, dtype_bytes=elt)
        for l in range(depth):
            if l % 2 == 0:      # column: W [n/p, n]; megatron computes dX for the first layer too
                terms.update([Gemm(b, n, m, b_t=True), Gemm(m, b, n, a_t=True), Gemm(b, m, n)])
                out = m
                overlaps.append((Gemm(m, b, n, a_t=True),))    # the async dX all-reduce under dW
                if l == depth - 1:
                    overlaps.append(())                         # the gathered output
            else:               # row: W [n, n/p]
                terms.update([Gemm(b, m, n, b_t=True), Gemm(n, b, m, a_t=True), Gemm(b, n, m)])
                out = n
                overlaps.append(())                             # the output all-reduce, synchronous
            terms.update([Pointwise("bias_grad", b, out), Pointwise("bias_add", b, out)])
            if l < depth - 1:
                terms[Pointwise("act", b, out, activation)] += 1
        if depth % 2 and p > 1:  # an odd last (column) layer: its output all-gathered and concatenated
            terms[Pointwise("copy", b, n)] += 1
    terms[Pointwise("loss", b, n)] += 1
    terms[Optimizer(c.params_per_rank)] += 1
    colls = [Collective(msg.op, msg.values, p, msg.bytes_sent) for msg in c.messages]
    terms.update(colls)
    if p == 1:
        overlaps = []
    assert len(overlaps) == len(colls), (mode, len(overlaps), len(colls))
    gemms = {t: n for t, n in terms.items() if isinstance(t, Gemm)}
    if colls and gemms:          # the compute between two collectives, as calls of the step's main GEMM
        unit = max(gemms, key=lambda g: (gemms[g] * g.macs, g.macs, repr(g)))
        per_segment = sum(g.macs * n for g, n in gemms.items()) / len(colls)
        calls = max(1, round(per_segment / unit.macs))
        terms.update(Wait(unit, calls, coll, ov) for coll, ov in zip(colls, overlaps))
    if framework:
        terms[Framework(mode, depth, p)] += 1
    return terms


def gemm_chain(terms: collections.Counter) -> list:
    """The step's GEMMs one by one, each occurrence of a shape counted (``Counter.elements``):
    timed back to back with its own operands each, as a step runs them (:func:`predict`)."""
    return [t for t in terms.elements() if isinstance(t, Gemm)]


def predict(terms: collections.Counter, seconds: dict, gemm_chain_s: Optional[float] = None) -> dict:
    """Predicted step time from measured ``seconds[term]``: the total and its parts by kind.

    ``gemm_chain_s``: the time of :func:`gemm_chain` run as one chain; it is the GEMM part, in
    place of the GEMM shapes timed one at a time (which ``seconds`` then need not hold). A step's GEMMs each read their own weights and
    activations; one shape repeated back to back keeps its operands in cache, which measured 11 %
    (TP) to 27 % (phantom) faster than the chain at width 1024 on the 2-core CPU machine, where the
    chain matched the GEMM time of a profiled real step within 2 %.
    """
    parts = collections.Counter()
    for term, count in terms.items():
        if gemm_chain_s is None or not isinstance(term, Gemm):
            parts[type(term).__name__.lower()] += count * seconds[term]
    if gemm_chain_s is not None:
        parts["gemm"] = gemm_chain_s
    return {"step_time_s": sum(parts.values()), "parts_s": dict(parts)}


@dataclasses.dataclass(frozen=True)
class LinkFit:
    """Time of one collective ``op`` on ``p`` ranks as ``alpha_s + beta_s_per_byte * bytes_sent``
    (bytes one rank sends, as :class:`Collective` counts them)."""
    op: str
    p: int
    alpha_s: float
    beta_s_per_byte: float

    def seconds(self, bytes_sent: int) -> float:
        return self.alpha_s + self.beta_s_per_byte * bytes_sent

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return 1.0 / self.beta_s_per_byte if self.beta_s_per_byte > 0 else float("inf")


def fit_alpha_beta(samples) -> tuple[float, float]:
    """``(alpha, beta)`` of ``seconds = alpha + beta * size`` from ``(size, seconds)`` samples, several
    repetitions per size: the median of each size first (a repetition that queued behind another
    process moves nothing), then least squares over the sizes weighted by ``1 / median**2``, so a
    1 KB and a 1 MB message count by their relative error. Both are kept ``>= 0`` (the best fit
    with the other at its bound). Needs two distinct sizes."""
    by_size: dict = collections.defaultdict(list)
    for size, secs in samples:
        by_size[float(size)].append(float(secs))
    if len(by_size) < 2:
        raise ValueError(f"fit_alpha_beta: needs samples at two or more sizes, got {sorted(by_size)}")
    pts = [(x, statistics.median(ts)) for x, ts in sorted(by_size.items())]
    w = [1.0 / max(y, 1e-12) ** 2 for _, y in pts]
    sw = sum(w)
    sx = sum(wi * x for wi, (x, _) in zip(w, pts))
    sy = sum(wi * y for wi, (_, y) in zip(w, pts))
    sxx = sum(wi * x * x for wi, (x, _) in zip(w, pts))
    sxy = sum(wi * x * y for wi, (x, y) in zip(w, pts))
    det = sw * sxx - sx * sx
    beta = (sw * sxy - sx * sy) / det if det > 0 else 0.0
    alpha = (sy - beta * sx) / sw
    if beta < 0:                 # slower for smaller messages: noise; the weighted mean, flat
        return sy / sw, 0.0
    if alpha < 0:                # through the origin
        return 0.0, sxy / sxx
    return alpha, beta


def ladder(largest: int, p: int, points: int = 7) -> list[int]:
    """Message sizes (values, multiples of ``p``) for fitting a collective: geometric from one
    value per rank to ``largest``, ``points`` of them (fewer when they coincide)."""
    top = max(1, -(-largest // p))
    out = sorted({max(1, round(top ** (i / (points - 1)))) * p for i in range(points)})
    return out
