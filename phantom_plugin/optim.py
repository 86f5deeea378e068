"""Optimizer parameter groups for models holding phantom layers: ``param_groups(model, lr)``.

Each parameter gets a *kind*: ``"local"`` (``L_i``), ``"compressor"`` (``C_i``),
``"decompressor"`` (``D_ij``) of a :class:`~phantom_plugin.layers.PhantomLinear` (found by
module type, so a Megatron ``PhantomMLP`` or a DeepSpeed-wrapped model works alike), ``"bias"``
(any 1-d parameter: phantom and other biases, norm gains) and ``"other"`` (every other
parameter: embeddings, attention, dense layers). The group of kind ``t`` has
``lr = lr * multipliers[t]`` and ``weight_decay`` (0 for ``"bias"``, the usual convention), and
carries ``"kind"`` and ``"lr_mult"`` so a scheduler can rescale it.

Default multipliers (the parametrisation study in ``docs/choosing-k.md``): 1.0
for every kind, except that a layer's compressor and decompressor get
``factor_lr_mult(k, n_in/p) = 1 / (1 + k / (n_in/p))``. Under Adam every entry moves by about
``lr`` whatever its scale, so the dense-equivalent update of ``D_ij C_j`` grows with the share
``k / (n_in/p)`` of the block's rank the factors span: measured at 0.8x a dense layer's
off-diagonal update at ``k / (n_in/p) = 1/32``, 1.0x at 1/4 and 2.0x at 1; the rule brings it
back to about 1x (it is ~1 at the small ``k`` that saves parameters, 0.5 at full rank).
Explicit ``multipliers`` replace it for every layer (and suit SGD, which is not scale-invariant).
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import nn

__all__ = ["KINDS", "DEFAULT_MULTIPLIERS", "factor_lr_mult", "param_groups", "param_kinds"]

KINDS = ("local", "compressor", "decompressor", "bias", "other")
DEFAULT_MULTIPLIERS: Mapping[str, float] = {kind: 1.0 for kind in KINDS}


def factor_lr_mult(ghost_dim: int, local_in: int) -> float:
    """Default lr multiplier of ``C_i`` and ``D_ij`` for ``k = ghost_dim`` and ``n_in/p = local_in``."""
    return 1.0 / (1.0 + ghost_dim / local_in)


def param_kinds(model: nn.Module) -> dict[int, tuple[str, float]]:
    """``{id(param): (kind, default multiplier)}`` for every parameter of ``model``."""
    from .layers import PhantomLinear
    kinds: dict[int, tuple[str, float]] = {}
    for module in model.modules():
        if isinstance(module, PhantomLinear):
            factor = factor_lr_mult(module.ghost_dim, module.in_features // module.group_size)
            for name, kind, mult in (("local_weight", "local", 1.0), ("compressor", "compressor", factor),
                                     ("decompressor", "decompressor", factor)):
                param = getattr(module, name)
                if param is not None:
                    kinds[id(param)] = (kind, mult)
    for param in model.parameters():
        if id(param) not in kinds:
            kinds[id(param)] = ("bias" if param.dim() <= 1 else "other", 1.0)
    return kinds


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, *,
                 multipliers: Optional[Mapping[str, float]] = None) -> list[dict]:
    """Parameter groups for ``torch.optim.Adam``/``AdamW`` (or any optimizer taking groups).

    Args:
        model: any module; phantom blocks are recognised wherever they sit.
        lr: the base learning rate; group ``t`` gets ``lr * multipliers[t]``.
        weight_decay: for every kind but ``"bias"`` (1-d parameters are not decayed).
        multipliers: ``{kind: multiplier}`` replacing the defaults (``factor_lr_mult`` for
            compressors and decompressors, 1.0 otherwise) for every parameter of that kind;
            unknown kinds or non-positive values raise.

    Returns one group per (kind, multiplier) in :data:`KINDS` order (layers of different
    ``k / (n_in/p)`` get separate factor groups), each
    ``{"params", "lr", "weight_decay", "kind", "lr_mult"}``. Frozen parameters are left out.
    """
    if not lr > 0:
        raise ValueError(f"param_groups: lr must be > 0, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"param_groups: weight_decay must be >= 0, got {weight_decay!r}")
    given = dict(multipliers or {})
    for kind, value in given.items():
        if kind not in KINDS:
            raise ValueError(f"param_groups: unknown kind {kind!r} in multipliers; kinds are {list(KINDS)}")
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"param_groups: multipliers[{kind!r}] must be a number > 0, got {value!r}")
    kinds = param_kinds(model)
    grouped: dict[tuple[str, float], list] = {}
    seen: set[int] = set()
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            kind, default = kinds[id(param)]
            grouped.setdefault((kind, float(given.get(kind, default))), []).append(param)
    order = sorted(grouped, key=lambda key: (KINDS.index(key[0]), -key[1]))
    return [{"params": grouped[key], "lr": lr * key[1], "lr_mult": key[1], "kind": key[0],
             "weight_decay": 0.0 if key[0] == "bias" else weight_decay} for key in order]
