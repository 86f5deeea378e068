"""ZeRO-3 with phantom layers: partitions over the data-parallel group only.

Phantom parameters differ from phantom rank to phantom rank, so ZeRO-3 may partition them only
over the data-parallel group (whose ranks hold the same ones). DeepSpeed does that when it is
given the plugin's ``mpu``: ``deepspeed.initialize`` turns every parameter that is not yet a
ZeRO parameter into one partitioned over ``mpu.get_data_parallel_group()``.

A model built inside ``deepspeed.zero.Init`` without that group (what ``from_pretrained`` does
under a ZeRO-3 config) already holds ZeRO parameters partitioned over the **whole world**: the
SVD would read empty tensors, and DeepSpeed would partition the new phantom parameters like the
old ones, over the world -- mixing different phantom ranks' blocks into one parameter, silently
wrong. :func:`materialize` therefore gathers every such parameter (``GatheredParameters``, a
collective over its own partition group) into a plain full parameter before the conversion
(tied parameters stay tied); ``deepspeed.initialize`` then partitions all of them, dense and
phantom, over the data-parallel group. The cost: each rank holds the whole model once, between
the conversion and ``deepspeed.initialize`` (as under ZeRO 0-2).

:func:`gathered` is the ``gather`` hook of :func:`phantom_plugin.convert.to_dense` for
:func:`phantom_plugin.deepspeed.to_dense`; :func:`release` turns an engine's partitioned module
back into a plain one (DeepSpeed's hooks removed, every parameter gathered in full) for
``save_pretrained``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["is_partitioned", "materialize", "gathered", "release"]


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter."""
    return hasattr(p, "ds_id")


def _plain(model: nn.Module) -> int:
    """Replace every ZeRO-3 parameter of ``model`` by a plain one holding its full data (collective)."""
    import deepspeed
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not is_partitioned(p):
                continue
            if id(p) not in done:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    done[id(p)] = nn.Parameter(p.data.detach().clone(), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
    return len(done)


def materialize(model: nn.Module) -> int:
    """Gather a ``zero.Init`` model's parameters into plain full ones; returns how many (collective).

    Call on every rank, before the conversion; a model without ZeRO-3 parameters is left as is
    (and nothing is communicated).
    """
    if not any(is_partitioned(p) for p in model.parameters()):
        return 0
    return _plain(model)


def gathered(params: list) -> contextlib.AbstractContextManager:
    """``convert.to_dense``'s ``gather`` hook: the full data of ZeRO-3 ``params`` inside the block."""
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters([p for p in params if is_partitioned(p)], modifier_rank=None)


def release(engine) -> nn.Module:
    """The engine's module as a plain model: ZeRO-3 hooks removed, parameters gathered in full."""
    opt = getattr(engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", None)
    if offload is not None:
        offload.destroy()                       # its module hooks would fetch plain params
    model = engine.module
    _plain(model)
    return model
