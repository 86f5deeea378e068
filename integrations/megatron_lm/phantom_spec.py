"""Module-level GPT layer specs with phantom MLPs, for Megatron-LM's ``--spec <module> <name>``.

Megatron-LM imports this module and takes ``vars(module)[name]`` without calling it, so the specs
are built at import time from environment variables:

* ``PHANTOM_GHOST_DIM`` (required): ``k``, ghost neurons per rank, ``1 <= k <= min(h, ffn)/p``.
* ``PHANTOM_SEED`` (default 0): phantom initialisation seed.

Objects (all megatron-core local-spec flavour unless named ``te``):

* ``phantom_layer_spec``: ``get_gpt_layer_local_spec()`` with phantom MLPs (LayerNorm).
* ``phantom_rmsnorm_layer_spec``: the same with ``normalization="RMSNorm"``.
* ``phantom_te_layer_spec``: the Transformer Engine spec with phantom MLPs and the MLP norm
  restored; defined only when Transformer Engine is installed.

Errors are raised as ``RuntimeError`` (bad environment) or ``ValueError`` (nothing to swap, from
:func:`~phantom_plugin.megatron.with_phantom_mlp`), never ``ImportError``: megatron's importer
swallows ``ImportError`` and would silently fall back to its default spec.
"""
from __future__ import annotations

import os

from megatron.core.models.gpt import gpt_layer_specs as _specs

try:
    from phantom_plugin.megatron import get_gpt_layer_phantom_spec
except ImportError as e:   # e.g. megatron-core older than supported: megatron would swallow ImportError
    raise RuntimeError(f"phantom_plugin.integrations.megatron_lm.phantom_spec: {e}") from e


def _env_int(name: str, default=None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise RuntimeError(f"phantom_plugin.integrations.megatron_lm.phantom_spec: set {name}, e.g. "
                               f"`{name}=64 torchrun ... pretrain_gpt.py --spec "
                               "phantom_plugin.integrations.megatron_lm.phantom_spec phantom_layer_spec`")
        return default
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"phantom_plugin.integrations.megatron_lm.phantom_spec: {name}={raw!r} is not an integer") from None


GHOST_DIM = _env_int("PHANTOM_GHOST_DIM")
SEED = _env_int("PHANTOM_SEED", 0)
if GHOST_DIM < 1:
    raise RuntimeError(f"phantom_plugin.integrations.megatron_lm.phantom_spec: PHANTOM_GHOST_DIM={GHOST_DIM} must be >= 1")

phantom_layer_spec = get_gpt_layer_phantom_spec(ghost_dim=GHOST_DIM, seed=SEED)
phantom_rmsnorm_layer_spec = get_gpt_layer_phantom_spec(ghost_dim=GHOST_DIM, seed=SEED,
                                                        normalization="RMSNorm")
if _specs.HAVE_TE:
    phantom_te_layer_spec = get_gpt_layer_phantom_spec(ghost_dim=GHOST_DIM, seed=SEED, use_te=True)
