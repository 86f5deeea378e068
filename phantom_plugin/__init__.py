"""phantom_plugin: phantom parallelism (arXiv 2508.00960) for PyTorch, Megatron-core and DeepSpeed.

Importing this package has no side effects and imports neither torch, megatron nor deepspeed: the
public names below load their module on first use (so the DeepSpeed import hook, which runs at
interpreter start, stays cheap). The adapters live in ``phantom_plugin.megatron`` and
``phantom_plugin.deepspeed``; the layering is described in ``docs/architecture.md``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "PhantomLinear": "layers", "PhantomFFN": "layers", "mark_tensor_parallel": "layers",
    "phantom_linear": "ops", "scatter_to_group": "ops", "gather_from_group": "ops",
    "sequence_to_hidden": "ops", "hidden_to_sequence": "ops",
    "param_groups": "optim", "CommCounter": "counter",
}
__all__ = ["CommCounter", "PhantomFFN", "PhantomLinear", "gather_from_group", "hidden_to_sequence",
           "mark_tensor_parallel", "param_groups", "phantom_linear", "scatter_to_group", "sequence_to_hidden"]

if TYPE_CHECKING:   # for type checkers and IDEs; at run time the names load lazily
    from .counter import CommCounter
    from .layers import PhantomFFN, PhantomLinear, mark_tensor_parallel
    from .ops import (gather_from_group, hidden_to_sequence, phantom_linear, scatter_to_group,
                      sequence_to_hidden)
    from .optim import param_groups


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'phantom_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
