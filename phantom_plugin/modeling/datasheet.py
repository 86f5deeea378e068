"""Step time on a GPU from its datasheet, not measured: the terms of :mod:`phantom_plugin.modeling.step_model`
(``phantom-plan --calibrate``'s model) priced at a device's published peak rates and a stated link
(``phantom-plan ... --datasheet h100-sxm``; the figures are :data:`.devices.DEVICES`). Every figure
it returns is **extrapolated**, and says so.

How each term is priced (one rank, one training step):

* :class:`~step_model.Gemm`: a roofline, ``max(2 * MACs / (peak * efficiency), bytes / memory rate)``
  with ``bytes`` the two operands read and the output written once: the wide GEMMs are bound by
  the tensor cores, phantom's ``k``-wide ones (``x C^T``, ``dg^T x``, ...) can be bound by memory;
* :class:`~step_model.Pointwise` and :class:`~step_model.Optimizer`: bytes over the memory rate
  (:data:`POINTWISE_PASSES` passes over the tensor; fused Adam reads parameter, grad and both
  moments and writes three, in the model's dtype as ``phantom-bench`` runs it);
* :class:`~step_model.Collective`: ``latency + bytes_sent / link`` per direction (NCCL ring: the
  bytes :mod:`phantom_plugin.modeling.counts` counts), the link NVLink within a node and the network per GPU
  across nodes (:func:`link_for`);
* :class:`~step_model.Wait`: NCCL runs on its own stream, so an async collective hides under the GEMMs
  the code runs while it is in flight (phantom's ghost exchange under the local GEMMs, megatron's
  input-grad all-reduce under ``dW``): its wait is ``-min(collective, those GEMMs)``, a synchronous
  one's 0. The SMs NCCL takes from the GEMMs are not modeled;
* :class:`~step_model.Framework`: 0, kernel launches assumed hidden behind the GPU's work.

So it is a lower bound at ``efficiency = 1`` (the datasheet peak): large bf16 GEMMs reach a
fraction of it, which ``benchmarks/gpu_layer_check.py`` measures on a card. Leaf module: torch-free.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .. import dtypes
from . import devices, step_model
from .devices import Device

__all__ = ["Link", "POINTWISE_PASSES", "ADAM_PASSES", "GPUS_PER_NODE", "NET_BYTES_PER_S", "NVLINK_LATENCY_S",
           "NET_LATENCY_S", "link_for", "term_seconds", "extrapolate"]


# passes over a [rows, cols] tensor, each a read or a write of every element
POINTWISE_PASSES = {"act": 5,        # forward: read h, write y; backward: read h and dy, write dh
                    "bias_grad": 1,  # read dy
                    "bias_add": 2,   # read, write
                    "copy": 2,       # read, write
                    "loss": 5}       # forward: read y and target; backward: read both, write dy
ADAM_PASSES = 7                      # read parameter, grad, two moments; write parameter, two moments

# assumptions, not datasheet figures (override with link_for's arguments)
GPUS_PER_NODE = 8
NET_BYTES_PER_S = 50e9               # one 400 Gb/s NDR InfiniBand NIC per GPU, per direction
NVLINK_LATENCY_S, NET_LATENCY_S = 10e-6, 20e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class Link:
    """What one collective costs: ``latency_s + bytes_sent / bytes_per_s``; ``words`` say which link."""
    bytes_per_s: float
    latency_s: float
    words: str

    def seconds(self, bytes_sent: int) -> float:
        return self.latency_s + bytes_sent / self.bytes_per_s


def link_for(sheet: Device, p: int, *, gpus_per_node: int = GPUS_PER_NODE,
             bytes_per_s: Optional[float] = None, latency_s: Optional[float] = None) -> Link:
    """The link of a group of ``p`` GPUs: NVLink (the sheet's, per direction) when the group fits in
    one node of ``gpus_per_node``, else the network per GPU (:data:`NET_BYTES_PER_S`); the latency
    per collective is an assumption (:data:`NVLINK_LATENCY_S`, :data:`NET_LATENCY_S`).
    ``bytes_per_s`` / ``latency_s`` replace them."""
    if p <= gpus_per_node:
        bw, lat = sheet.nvlink_bytes_per_s, NVLINK_LATENCY_S
        words = f"NVLink within one node ({sheet.nvlink_bytes_per_s / 1e9:g} GB/s per direction, datasheet)"
    else:
        bw, lat = NET_BYTES_PER_S, NET_LATENCY_S
        words = (f"network across {-(-p // gpus_per_node)} nodes ({NET_BYTES_PER_S / 1e9:g} GB/s per GPU per "
                 "direction: one 400 Gb/s NIC per GPU, an assumption)")
    if bytes_per_s is not None:
        bw, words = bytes_per_s, f"a link of {bytes_per_s / 1e9:g} GB/s per direction (given)"
    if latency_s is not None:
        lat = latency_s
    if bw <= 0 or lat < 0:
        raise ValueError(f"link_for: bytes_per_s must be > 0 and latency_s >= 0, got {bw} and {lat}")
    return Link(bytes_per_s=bw, latency_s=lat,
                words=f"{words}, {lat * 1e6:g} us per collective ({'given' if latency_s is not None else 'assumed'})")


def term_seconds(term, sheet: Device, dtype: str, link: Link, efficiency: float = 1.0) -> float:
    """Seconds of one :mod:`~phantom_plugin.modeling.step_model` term at the sheet's rates (module
    docstring); ``dtype`` a short name of :data:`phantom_plugin.dtypes.DTYPES`."""
    elt = dtypes.lookup(dtype, "term_seconds: dtype").bytes
    mem = sheet.memory_bytes_per_s
    if isinstance(term, step_model.Gemm):
        moved = (term.m * term.k + term.k * term.n + term.m * term.n) * elt
        return max(2 * term.macs / (sheet.matmul_flops[dtype] * efficiency), moved / mem)
    if isinstance(term, step_model.Pointwise):
        return POINTWISE_PASSES[term.kind] * term.rows * term.cols * elt / mem
    if isinstance(term, step_model.Optimizer):
        return ADAM_PASSES * term.numel * elt / mem
    if isinstance(term, step_model.Collective):
        return link.seconds(term.bytes_sent)
    if isinstance(term, step_model.Wait):
        if not term.overlap:
            return 0.0
        hidden = sum(term_seconds(g, sheet, dtype, link, efficiency) for g in term.overlap)
        return -min(link.seconds(term.coll.bytes_sent), hidden)
    if isinstance(term, step_model.Framework):
        return 0.0
    raise TypeError(f"not a timing term: {term!r}")


def extrapolate(width: int, depth: int, ranks: int, ghosts: int, batch: int, dtype: str, device: str, *,
                activation: str = "gelu", efficiency: float = 1.0, link_bytes_per_s: Optional[float] = None,
                link_latency_s: Optional[float] = None, gpus_per_node: int = GPUS_PER_NODE) -> dict:
    """Both models' step time on ``ranks`` GPUs of ``device`` (a key of :data:`.devices.DEVICES`), per rank:
    ``{"extrapolated_step_time_s": {"tp", "phantom"}, "extrapolated_ratio", "extrapolated_parts_s",
    "extrapolation": {the figures used, their sources, "label"}}``."""
    sheet = devices.device(device, "datasheet")
    canon = dtypes.lookup(dtype, "datasheet: dtype").name
    if canon not in sheet.matmul_flops:
        raise ValueError(f"datasheet: no {dtype!r} matmul rate for {device}; use one of {sorted(sheet.matmul_flops)}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"datasheet: efficiency must be in (0, 1] (a share of the peak GEMM rate), got {efficiency}")
    link = link_for(sheet, ranks, gpus_per_node=gpus_per_node, bytes_per_s=link_bytes_per_s, latency_s=link_latency_s)
    out = {}
    for mode in ("tp", "phantom"):
        terms = step_model.step_terms(mode, width, depth, p=ranks, batch=batch, k=ghosts, activation=activation,
                                  dtype=canon)
        secs = {t: term_seconds(t, sheet, canon, link, efficiency) for t in terms}
        out[mode] = step_model.predict(terms, secs)
    t = {m: out[m]["step_time_s"] for m in out}
    return {"extrapolated_step_time_s": t, "extrapolated_ratio": t["phantom"] / t["tp"],
            "extrapolated_parts_s": {m: out[m]["parts_s"] for m in out},
            "extrapolation": {
                "label": "extrapolated from datasheet figures, not measured",
                "device": sheet.name, "dtype": canon, "matmul_flops_per_s": sheet.matmul_flops[canon],
                "gemm_efficiency": efficiency, "memory_bytes_per_s": sheet.memory_bytes_per_s,
                "link_bytes_per_s": link.bytes_per_s, "link_latency_s": link.latency_s, "link": link.words,
                "source": sheet.source,
                "model": "GEMMs on a roofline at the peak rate x efficiency; pointwise, optimizer at the memory "
                         "rate; async collectives hidden under the GEMMs the code runs while they fly (NCCL's "
                         "own stream; the SMs it takes not modeled); framework and launches 0"}}
