"""Model-spec swap: the user's GPT layer / block spec with phantom MLPs in place of dense ones.

:func:`with_phantom_mlp` deep-copies a layer spec (``ModuleSpec`` of a ``TransformerLayer``), a
block spec (``ModuleSpec`` of a ``TransformerBlock``) or ``TransformerBlockSubmodules`` and
replaces every dense ``MLP`` (or Transformer Engine ``TEFusedMLP``) with :class:`PhantomMLP`.
MoE layers are left alone and the input is never mutated. Attention, norms, data and pipeline
parallelism are untouched.

In the Transformer Engine spec the MLP norm is fused into fc1 (``TELayerNormColumnParallelLinear``,
``pre_mlp_layernorm = IdentityOp``). The phantom fc1 has no norm, so the swap restores a real
``pre_mlp_layernorm`` (``TENorm``; megatron's local norm without TE) and adds the key map
``{"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}``, as megatron's local spec does, so the
norm weights of stock checkpoints still load.
"""
from __future__ import annotations

import copy
import warnings
from typing import Union

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from .mlp import PhantomMLP

__all__ = ["with_phantom_mlp", "get_gpt_layer_phantom_spec", "NORM_KEY_MAP"]

NORM_KEY_MAP = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}

Spec = Union[ModuleSpec, TransformerBlockSubmodules]


def _dense_mlp_classes() -> tuple:
    classes = [MLP]
    try:
        from megatron.core.extensions.transformer_engine import TEFusedMLP
    except ImportError:
        TEFusedMLP = None
    if TEFusedMLP is not None:
        classes.append(TEFusedMLP)
    return tuple(classes)


def _default_norm():
    """``TENorm`` when Transformer Engine is importable, else megatron's local norm."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm
        return TENorm
    except ImportError:
        from megatron.core.models.gpt.gpt_layer_specs import LNImpl
        return LNImpl


def _is_identity(spec) -> bool:
    return spec is IdentityOp or (isinstance(spec, ModuleSpec) and spec.module is IdentityOp)


def _norm_is_fused(mlp_spec: ModuleSpec) -> bool:
    fc1 = getattr(mlp_spec.submodules, "linear_fc1", None)
    fc1 = fc1.module if isinstance(fc1, ModuleSpec) else fc1
    return getattr(fc1, "__name__", "").endswith("LayerNormColumnParallelLinear")


def _swap_layer(sub: TransformerLayerSubmodules, ghost_dim: int, seed: int, norm) -> int:
    mlp = sub.mlp
    if not isinstance(mlp, ModuleSpec) or mlp.module not in _dense_mlp_classes():
        return 0                                  # MoE, identity or a custom module: leave it
    if _norm_is_fused(mlp):
        if not _is_identity(sub.pre_mlp_layernorm):
            raise ValueError("with_phantom_mlp: the spec fuses the MLP norm into fc1 and also has a "
                             "pre_mlp_layernorm; this combination would normalise twice")
        sub.pre_mlp_layernorm = norm if norm is not None else _default_norm()
        sub.sharded_state_dict_keys_map = {**sub.sharded_state_dict_keys_map, **NORM_KEY_MAP}
    sub.mlp = ModuleSpec(module=PhantomMLP, params={"ghost_dim": ghost_dim, "seed": seed})
    return 1


def _swap(spec, ghost_dim: int, seed: int, norm) -> int:
    if isinstance(spec, TransformerBlockSubmodules):
        return sum(_swap(s, ghost_dim, seed, norm) for s in spec.layer_specs or [])
    if isinstance(spec, ModuleSpec):
        if isinstance(spec.submodules, TransformerLayerSubmodules):
            return _swap_layer(spec.submodules, ghost_dim, seed, norm)
        if isinstance(spec.submodules, TransformerBlockSubmodules):
            return _swap(spec.submodules, ghost_dim, seed, norm)
        return 0
    raise TypeError(f"with_phantom_mlp: expected a layer spec, a block spec or "
                    f"TransformerBlockSubmodules, got {type(spec).__name__}")


def with_phantom_mlp(spec: Spec, *, ghost_dim: int, seed: int = 0, norm=None) -> Spec:
    """A copy of ``spec`` with every dense MLP replaced by ``PhantomMLP(ghost_dim=ghost_dim)``.

    Args:
        spec: layer spec, block spec or ``TransformerBlockSubmodules`` (local or TE flavour).
        ghost_dim: ``k`` ghost neurons per rank, ``1 <= k <= min(h, ffn)/p``.
        seed: phantom initialisation seed (layer ``l`` draws from ``(seed, l)``).
        norm: the norm class restored where TE fused it into fc1 (default: ``TENorm``, or
            megatron's local norm without TE).
    Warns when nothing was swapped (e.g. an all-MoE spec).
    """
    if not isinstance(ghost_dim, int) or isinstance(ghost_dim, bool) or ghost_dim < 1:
        raise ValueError(f"with_phantom_mlp: ghost_dim must be an integer >= 1, got {ghost_dim!r}")
    out = copy.deepcopy(spec)
    if _swap(out, ghost_dim, seed, norm) == 0:
        warnings.warn("with_phantom_mlp: the spec has no dense MLP (MLP/TEFusedMLP); nothing was "
                      "replaced", stacklevel=2)
    return out


def get_gpt_layer_phantom_spec(*, ghost_dim: int, use_te: bool = False, seed: int = 0,
                               norm=None, **spec_kwargs) -> ModuleSpec:
    """``get_gpt_layer_local_spec(**spec_kwargs)`` (or the TE spec) with phantom MLPs."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    if use_te:
        if not specs.HAVE_TE:
            raise ImportError("get_gpt_layer_phantom_spec(use_te=True) needs Transformer Engine; "
                              "install it or pass use_te=False for the local spec")
        base = specs.get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)
    else:
        base = specs.get_gpt_layer_local_spec(**spec_kwargs)
    return with_phantom_mlp(base, ghost_dim=ghost_dim, seed=seed, norm=norm)
