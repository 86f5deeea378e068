"""Model-spec swap: the user's GPT layer / block spec with phantom MLPs in place of dense ones.

:func:`with_phantom_mlp` deep-copies a layer spec (``ModuleSpec`` of a ``TransformerLayer``), a
block spec (``ModuleSpec`` of a ``TransformerBlock``) or ``TransformerBlockSubmodules`` and
replaces every dense MLP with :class:`PhantomMLP`. A dense MLP appears in a layer spec in one of
two forms, depending on the megatron-core release:

* ``ModuleSpec(module=MLP, submodules=MLPSubmodules(...))`` (0.16, 0.17; also accepted later), and
* ``functools.partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(...))`` (0.18 and later),

with ``MLP``, Transformer Engine's ``TEFusedMLP`` or ``TEFusedMLPWithGroupedLinear``. The output
is always ``ModuleSpec(module=PhantomMLP, params={...})``, which both 0.16/0.17's ``build_module``
and 0.18+'s ``TransformerLayer`` (it calls the spec) build. MoE layers are left alone and the input is
never mutated. When nothing is swapped (an all-MoE spec, a layout this module does not know) a
``ValueError`` names what was found: never a silent no-op.

In the Transformer Engine spec the MLP norm is fused into fc1 (``TELayerNormColumnParallelLinear``,
``pre_mlp_layernorm = IdentityOp``). The phantom fc1 has no norm, so the swap restores a real
``pre_mlp_layernorm`` (``TENorm``; megatron's local norm without TE) and adds the key map
``{"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}``, as megatron's local spec does, so the
norm weights of stock checkpoints still load.
"""
from __future__ import annotations

import copy
import functools
from typing import Optional, Union

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from ..init import INIT_SCHEMES
from ..shapes import ghost_dim_error
from .mlp import PhantomMLP

__all__ = ["with_phantom_mlp", "get_gpt_layer_phantom_spec", "count_phantom_mlps", "NORM_KEY_MAP"]

NORM_KEY_MAP = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}

Spec = Union[ModuleSpec, TransformerBlockSubmodules]

# keyword arguments of megatron's dense MLP that PhantomMLP honours; any other one is refused
_CARRIED_PARAMS = ("ffn_hidden_size", "input_size", "is_expert")
_DENSE_NAMES = "MLP, TEFusedMLP or TEFusedMLPWithGroupedLinear"


def _dense_mlp_classes() -> tuple:
    """``MLP`` plus the Transformer Engine dense MLPs this megatron-core defines (None without TE)."""
    classes = [MLP]
    try:
        from megatron.core.extensions import transformer_engine as te_ext
    except ImportError:
        te_ext = None
    for name in ("TEFusedMLP", "TEFusedMLPWithGroupedLinear"):
        cls = getattr(te_ext, name, None)
        if isinstance(cls, type):
            classes.append(cls)
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


def _name(obj) -> str:
    if isinstance(obj, tuple):                                    # ModuleSpec(module=(path, name))
        return ".".join(map(str, obj))
    owner = getattr(obj, "__self__", None)
    if isinstance(owner, type):                                   # a bound classmethod
        return f"{owner.__name__}.{obj.__name__}"
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _describe(entry) -> str:
    """How a spec entry reads in error messages: ``ModuleSpec(MoELayer)``, ``partial(MLP.as_mlp_submodule)``."""
    if isinstance(entry, ModuleSpec):
        return f"ModuleSpec({_name(entry.module)})"
    if isinstance(entry, functools.partial):
        return f"partial({_name(entry.func)})"
    return _name(entry)


def _target(entry):
    """The class an MLP entry builds, or ``None``: a ``ModuleSpec``'s module, a ``partial`` of a
    class or of its ``as_mlp_submodule`` classmethod."""
    if isinstance(entry, ModuleSpec):
        module = entry.module
        if isinstance(module, tuple) and len(module) == 2:        # (module path, class name)
            import importlib
            try:
                module = getattr(importlib.import_module(module[0]), module[1])
            except (ImportError, AttributeError):
                return None
        return module
    if isinstance(entry, functools.partial):
        func = entry.func
        if isinstance(func, type):
            return func
        owner = getattr(func, "__self__", None)
        if isinstance(owner, type) and getattr(func, "__name__", "") == "as_mlp_submodule":
            return owner
    return None


def _dense_mlp(entry) -> Optional[tuple]:
    """``(submodules, params)`` of a dense MLP entry in either form, or ``None`` for anything else."""
    target = _target(entry)
    if not any(target is cls for cls in _dense_mlp_classes()):
        return None
    if isinstance(entry, ModuleSpec):
        return entry.submodules, dict(entry.params)
    kwargs = dict(entry.keywords)
    submodules = kwargs.pop("submodules", entry.args[0] if entry.args else None)
    return submodules, kwargs


def _norm_is_fused(mlp_submodules) -> bool:
    fc1 = getattr(mlp_submodules, "linear_fc1", None)
    if isinstance(fc1, ModuleSpec):
        fc1 = fc1.module
    elif isinstance(fc1, functools.partial):
        fc1 = fc1.func
    return getattr(fc1, "__name__", "").endswith("LayerNormColumnParallelLinear")


def _is_identity(entry) -> bool:
    return entry is IdentityOp or (isinstance(entry, ModuleSpec) and entry.module is IdentityOp)


def _swap_layer(sub: TransformerLayerSubmodules, ghost_dim: int, seed: int, norm, found: list,
                init: str = "balanced") -> int:
    dense = _dense_mlp(sub.mlp)
    if dense is None:                                   # MoE, identity or a custom module: leave it
        found.append(_describe(sub.mlp))
        return 0
    submodules, params = dense
    extra = sorted(set(params) - set(_CARRIED_PARAMS))
    if extra:
        raise ValueError(f"with_phantom_mlp: the dense MLP entry {_describe(sub.mlp)} has parameters "
                         f"{extra} that PhantomMLP does not implement (it takes {list(_CARRIED_PARAMS)}); "
                         "drop them from the spec or leave this layer dense")
    found.append(_describe(sub.mlp))
    if _norm_is_fused(submodules):
        if not _is_identity(sub.pre_mlp_layernorm):
            raise ValueError("with_phantom_mlp: the spec fuses the MLP norm into fc1 and also has a "
                             f"pre_mlp_layernorm ({_describe(sub.pre_mlp_layernorm)}); this combination "
                             "would normalise twice")
        sub.pre_mlp_layernorm = norm if norm is not None else _default_norm()
        sub.sharded_state_dict_keys_map = {**sub.sharded_state_dict_keys_map, **NORM_KEY_MAP}
    extra_params = {} if init == "balanced" else {"init": init}
    sub.mlp = ModuleSpec(module=PhantomMLP, params={**params, "ghost_dim": ghost_dim, "seed": seed, **extra_params})
    return 1


def _swap(spec, ghost_dim: int, seed: int, norm, found: list, init: str = "balanced") -> int:
    if isinstance(spec, TransformerBlockSubmodules):
        return sum(_swap(s, ghost_dim, seed, norm, found, init) for s in spec.layer_specs or [])
    if isinstance(spec, ModuleSpec):
        if isinstance(spec.submodules, TransformerLayerSubmodules):
            return _swap_layer(spec.submodules, ghost_dim, seed, norm, found, init)
        if isinstance(spec.submodules, TransformerBlockSubmodules):
            return _swap(spec.submodules, ghost_dim, seed, norm, found, init)
        found.append(f"ModuleSpec({_name(spec.module)}) with submodules "
                     f"{type(spec.submodules).__name__} (not a transformer layer or block)")
        return 0
    raise TypeError(f"with_phantom_mlp: expected a layer spec, a block spec or "
                    f"TransformerBlockSubmodules, got {type(spec).__name__}")


def with_phantom_mlp(spec: Spec, *, ghost_dim: int, seed: int = 0, norm=None, init: str = "balanced") -> Spec:
    """A copy of ``spec`` with every dense MLP replaced by ``PhantomMLP(ghost_dim=ghost_dim)``.

    Args:
        spec: layer spec, block spec or ``TransformerBlockSubmodules`` (local or TE flavour; dense
            MLPs as ``ModuleSpec`` or as megatron-core 0.18+'s ``partial(...as_mlp_submodule)``).
        ghost_dim: ``k`` ghost neurons per rank, ``1 <= k <= min(h, ffn)/p``.
        seed: phantom initialisation seed (layer ``l`` draws from ``(seed, l)``).
        norm: the norm class restored where TE fused it into fc1 (default: ``TENorm``, or
            megatron's local norm without TE).
        init: the phantom blocks' initialisation scheme (``PhantomLinear``'s ``init``).
    Raises:
        ValueError: nothing to swap (e.g. an all-MoE spec); the message lists what each layer holds.
        TypeError: ``spec`` is not a spec.
    """
    error = ghost_dim_error(ghost_dim, 0, 1)   # the integer rule; the widths bound k when the MLPs are built
    if error:
        raise ValueError(f"with_phantom_mlp: {error}")
    out = copy.deepcopy(spec)
    found: list = []
    if init not in INIT_SCHEMES:
        raise ValueError(f"with_phantom_mlp: unknown init {init!r}; init must be one of {list(INIT_SCHEMES)}")
    if _swap(out, ghost_dim, seed, norm, found, init) == 0:
        raise ValueError(
            f"with_phantom_mlp: the spec has no dense MLP to replace; found {found or 'no layers'}. "
            f"Phantom MLPs replace dense {_DENSE_NAMES} (as a ModuleSpec or a functools.partial of "
            "the class or its as_mlp_submodule); MoE layers stay on megatron's modules. Pass a spec "
            "with at least one dense MLP layer, or use megatron's spec unchanged")
    return out


def get_gpt_layer_phantom_spec(*, ghost_dim: int, use_te: bool = False, seed: int = 0,
                               norm=None, **spec_kwargs) -> ModuleSpec:
    """``get_gpt_layer_local_spec(**spec_kwargs)`` (or the TE spec) with phantom MLPs.

    Raises ``ValueError`` when the spec has no dense MLP (e.g. ``num_experts`` set).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs
    if use_te:
        if not specs.HAVE_TE:
            raise ImportError("get_gpt_layer_phantom_spec(use_te=True) needs Transformer Engine; "
                              "install it or pass use_te=False for the local spec")
        base = specs.get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)
    else:
        base = specs.get_gpt_layer_local_spec(**spec_kwargs)
    return with_phantom_mlp(base, ghost_dim=ghost_dim, seed=seed, norm=norm)


def count_phantom_mlps(model) -> int:
    """How many :class:`PhantomMLP` modules a built model (or a list of model chunks) holds.

    Counts this rank's modules only (no collective): with pipeline parallelism each stage counts
    its own layers. Training scripts can assert it, e.g.
    ``assert count_phantom_mlps(model) == len(model.decoder.layers)``.
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return sum(isinstance(m, PhantomMLP) for chunk in chunks for m in chunk.modules())
