"""Megatron-core adapter: phantom MLPs through a model-spec swap.

* :class:`PhantomMLP` - drop-in for ``megatron.core.transformer.mlp.MLP``.
* :func:`with_phantom_mlp`, :func:`get_gpt_layer_phantom_spec` - spec swap (local or TE flavour).
* :func:`count_phantom_mlps` - how many phantom MLPs a built model holds (assert it in scripts).
* :func:`greedy_generate` - greedy decoding for a GPT model on any device (CPU included).
* :func:`convert_to_phantom` / :func:`to_dense` - trained TP MLPs <-> phantom MLPs.
* :func:`check_checkpoint`, :func:`save_checkpoint`, :func:`load_checkpoint` - dist_checkpointing.
* :mod:`.cpu` - ``CPUDotProductAttention`` for running GPT models on CPU (examples, tests).

Importing this module imports megatron-core (``pip install phantom_plugin[megatron]``); the rest
of ``phantom_plugin`` never does.
"""
try:
    import megatron.core  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("phantom_plugin.megatron needs megatron-core: pip install 'phantom_plugin[megatron]'") from e
else:  # an older release fails here with the version and the fix, not deep inside an import below
    from ._version import check_megatron_version
    check_megatron_version()

from .checkpoint import check_checkpoint, load_checkpoint, save_checkpoint
from .convert import MLPConversion, convert_to_phantom, dense_mlp_weights, to_dense
from .generate import greedy_generate
from .mlp import PhantomCheckpointError, PhantomMLP, resolve_tp_group
from .spec import NORM_KEY_MAP, count_phantom_mlps, get_gpt_layer_phantom_spec, with_phantom_mlp

__all__ = [
    "PhantomMLP", "PhantomCheckpointError", "resolve_tp_group", "with_phantom_mlp",
    "get_gpt_layer_phantom_spec", "count_phantom_mlps", "greedy_generate", "NORM_KEY_MAP",
    "convert_to_phantom", "to_dense", "dense_mlp_weights", "MLPConversion",
    "check_checkpoint", "save_checkpoint", "load_checkpoint",
]
