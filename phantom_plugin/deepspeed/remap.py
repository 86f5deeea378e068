"""Point what was built on the dense parameters at the phantom parameters that replaced them.

Hugging Face ``Trainer`` / Accelerate build the optimizer (AdamW with decay / no-decay groups)
or a ``DummyOptim`` (whose ``params`` become ``model_parameters``) before ``deepspeed.initialize``,
so they name the dense weights that conversion replaces. Following DeepSpeed's own remap after
its module replacements (``_remap_client_optimizer_after_module_replacement``), each replaced
parameter is swapped, in place and in its own group, for its replacements
(:func:`phantom_plugin.convert.parameter_sources`): a dense ``weight`` for the phantom layer's
``local_weight``, ``compressor`` and ``decompressor``, a dense ``bias`` for its ``bias``; every
other parameter stays where it was. An optimizer that already holds state (it has stepped) is
refused: its moments belong to the dense weights.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..convert import parameter_sources
from .config import PhantomConfigError

__all__ = ["remap_parameters", "remap_optimizer", "check_optimizer_fresh"]


def _remap_list(params: Iterable, live: set[int], before: dict[int, str],
                sources: dict[str, list[nn.Parameter]]) -> list:
    out, seen = [], set()
    for p in params:
        name = None if id(p) in live else before.get(id(p))
        for q in sources.get(name, [p]) if name is not None else [p]:
            if id(q) not in seen:
                seen.add(id(q))
                out.append(q)
    return out


def _sources(model: nn.Module) -> tuple[set[int], dict[str, list[nn.Parameter]]]:
    """Live parameter ids; for each old name its replacements (a phantom layer's parameters, or
    the full parameter that replaced a ZeRO-3 partitioned one of the same name)."""
    named = dict(model.named_parameters())
    return {id(p) for p in named.values()}, {**{n: [p] for n, p in named.items()}, **parameter_sources(model)}


def remap_parameters(model_parameters, model: nn.Module, before: dict[int, str]):
    """A ``model_parameters`` list (or list of param-group dicts) with replaced parameters swapped.

    ``before`` maps ``id`` of each parameter before conversion to its name in ``model``.
    ``None`` stays ``None``.
    """
    if model_parameters is None:
        return None
    items = list(model_parameters)
    live, sources = _sources(model)
    if items and isinstance(items[0], dict):
        return [{**g, "params": _remap_list(g["params"], live, before, sources)} for g in items]
    return _remap_list(items, live, before, sources)


def check_optimizer_fresh(optimizer) -> None:
    """Raise if a ready optimizer instance already has state (before any process group exists)."""
    state = getattr(optimizer, "state", None)
    if state and any(len(s) for s in state.values()):
        raise PhantomConfigError(
            "initialize: the optimizer passed in already has state (it has stepped on the dense "
            "weights), which cannot be carried over to the phantom parameters; build a fresh "
            "optimizer before training (Hugging Face Trainer does), or give it in the config's "
            "\"optimizer\" section")


def remap_optimizer(optimizer: Optional[torch.optim.Optimizer], model: nn.Module,
                    before: dict[int, str]) -> None:
    """Swap replaced parameters in ``optimizer.param_groups`` in place (each in its old group)."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return
    live, sources = _sources(model)
    for group in groups:
        group["params"] = _remap_list(group["params"], live, before, sources)
