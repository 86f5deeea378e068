"""``to_dense(engine)``: the trained phantom model as a plain dense model, on every rank.

Every phantom layer is replaced, in place, by the exactly equivalent dense layer of its original
type (:func:`phantom_plugin.convert.to_dense`: ``W[i,j] = D_ij C_j`` in float64, cast to the
layer's dtype), identical on every rank, so a Hugging Face model can then be written with
``model.save_pretrained(dir)`` on rank 0 and reloaded with ``from_pretrained`` (its config is
untouched). Under ZeRO 0-2 each rank holds the full, current module parameters, which is all
the export reads; under ZeRO-3 each phantom layer's partitions are gathered for its export, then
every other parameter too, and DeepSpeed's hooks leave the module (:func:`.zero3.release`): the
model returned is a plain one on every rank.

Call it on every rank once training is over: the engine's optimizer still points at the phantom
parameters, so the engine cannot train the exported model.
"""
from __future__ import annotations

from torch import nn

from .. import convert
from .engine import forget, routed
from .zero3 import gathered, release

__all__ = ["to_dense"]


def to_dense(engine) -> nn.Module:
    """The engine's model with every phantom layer replaced by its dense equivalent (collective)."""
    model = getattr(engine, "module", engine)
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    if stage == 3:
        engine.empty_partition_cache()     # prefetched (in-flight) parameters back to partitions
    with routed(engine):                   # the engine's collectives go through its route
        convert.to_dense(model, gather=gathered if stage == 3 else None)
    if stage == 3:
        release(engine)
    forget(model)
    if hasattr(engine, "phantom"):
        del engine.phantom
    return model
