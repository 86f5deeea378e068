"""phantom_plugin: phantom parallelism (arXiv 2508.00960) for PyTorch, Megatron-core and DeepSpeed.

Importing this package has no side effects and does not import megatron or deepspeed; their
adapters live in ``phantom_plugin.megatron`` and ``phantom_plugin.deepspeed``.
"""
from . import comm, convert, cost
from .comm import COUNTER
from .layers import PhantomFFN, PhantomLinear, mark_tensor_parallel
from .optim import param_groups
from .ops import (gather_from_group, hidden_to_sequence, phantom_linear, scatter_to_group,
                  sequence_to_hidden)

__all__ = [
    "PhantomLinear", "PhantomFFN", "phantom_linear", "scatter_to_group",
    "gather_from_group", "sequence_to_hidden", "hidden_to_sequence", "mark_tensor_parallel",
    "comm", "convert", "cost", "COUNTER", "param_groups",
]
__version__ = "0.1.0"
