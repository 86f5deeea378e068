"""Optimizer parameter groups for models holding phantom layers: ``param_groups(model, lr)``.

Each parameter gets a *kind*: ``"local"`` (``L_i``), ``"compressor"`` (``C_i``),
``"decompressor"`` (``D_ij``) of a :class:`~phantom_plugin.layers.PhantomLinear` (found by
module type, so a Megatron ``PhantomMLP`` or a DeepSpeed-wrapped model works alike), ``"bias"``
(any 1-d parameter: phantom and other biases, norm gains) and ``"other"`` (every other
parameter: embeddings, attention, dense layers). The group of kind ``t`` has
``lr = lr * multiplier`` and ``weight_decay`` (0 for ``"bias"``, the usual convention), and
carries ``"kind"`` and ``"lr_mult"`` so a scheduler can rescale it. ``lr`` is the learning rate
you would give the dense (TP) model.

A *parametrization* (:data:`PARAMETRIZATIONS`) sets each phantom layer's multipliers from its
``n_in``, ``k`` and ``p`` (the derivation and the measurements: ``docs/choosing-k.md``):

* ``"balanced"``: ``L_i`` at 1, ``C_i`` and ``D_ij`` at
  ``factor_lr_mult(k, n_in/p) = 1 / (1 + k / (n_in/p))`` (~1 at small ``k``, 0.5 at full rank),
  tuned on a synthetic dense teacher;
* ``"mup"``: per-factor maximal-update (spectral) Adam scaling, each factor's lr proportional to
  ``1 / fan_in`` relative to the dense layer's ``1 / n_in``: ``L_i`` and ``C_i`` (fan-in
  ``n_in/p``) at ``p``, the decompressor (fan-in ``(p-1) k``, the ghosts of the other ranks) at
  ``n_in / ((p-1) k)``;
* ``"mup-decompressor"``: ``"balanced"`` with only the decompressor at its maximal-update
  multiplier ``n_in / ((p-1) k)`` (``L_i`` and ``C_i`` as a dense layer's blocks);
* ``"spectral"``: ``"balanced"`` with the decompressor at twice its multiplier, the rates that
  measured best for layers built with ``init="spectral"``;
* ``"auto"`` (the default): per layer, ``"spectral"`` for a layer built with ``init="spectral"``
  and ``"balanced"`` otherwise (``init="balanced"``, or weights from ``from_dense``).

Measured on a synthetic teacher and a byte-level GPT (``docs/choosing-k.md``): the spectral init
with ``"spectral"`` rates won on both; ``"mup"``'s larger rates won on the teacher only and lost
on text at every lr tried.

Explicit ``multipliers`` replace the parametrization's value for the kinds they name, in every
layer (and suit SGD, which is not scale-invariant).
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import nn

__all__ = ["KINDS", "DEFAULT_MULTIPLIERS", "PARAMETRIZATIONS", "DEFAULT_PARAMETRIZATION", "factor_lr_mult",
           "layer_multipliers", "check_parametrization", "param_groups", "param_kinds"]

KINDS = ("local", "compressor", "decompressor", "bias", "other")
DEFAULT_MULTIPLIERS: Mapping[str, float] = {kind: 1.0 for kind in KINDS}
PARAMETRIZATIONS = ("auto", "balanced", "spectral", "mup", "mup-decompressor")
"""Names :func:`param_groups` accepts as ``parametrization`` (see the module docstring)."""
DEFAULT_PARAMETRIZATION = "auto"
"""What :func:`param_groups`, ``phantom-bench`` and the DeepSpeed adapter's ``"auto"`` use."""


def factor_lr_mult(ghost_dim: int, local_in: int) -> float:
    """``"balanced"`` lr multiplier of ``C_i`` and ``D_ij`` for ``k = ghost_dim`` and ``n_in/p = local_in``."""
    return 1.0 / (1.0 + ghost_dim / local_in)


def check_parametrization(parametrization: str, who: str = "param_groups") -> str:
    """``parametrization`` if it is one of :data:`PARAMETRIZATIONS`; else a ``ValueError`` naming them."""
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"{who}: unknown parametrization {parametrization!r}; "
                         f"parametrization must be one of {list(PARAMETRIZATIONS)}")
    return parametrization


def layer_multipliers(parametrization: str, in_features: int, ghost_dim: int, group_size: int) -> dict[str, float]:
    """``{"local", "compressor", "decompressor": lr multiplier}`` of one phantom layer.

    Args: ``in_features`` = ``n_in`` of the dense layer, ``ghost_dim`` = ``k``, ``group_size`` = ``p``
    (at ``p = 1`` only ``"local"`` matters and is 1). Relative to the dense layer's lr.
    """
    check_parametrization(parametrization, "layer_multipliers")
    p, k, local_in = group_size, ghost_dim, in_features / group_size
    if parametrization == "auto":
        raise ValueError("layer_multipliers: parametrization 'auto' depends on each layer's init; pass "
                         "'spectral' (init=\"spectral\") or 'balanced' (init=\"balanced\", from_dense)")
    if p == 1:
        return {"local": 1.0, "compressor": 1.0, "decompressor": 1.0}
    balanced = factor_lr_mult(k, local_in)
    mup_d = in_features / ((p - 1) * k)                  # dense fan-in n_in over D's fan-in (p-1)k
    if parametrization == "balanced":
        return {"local": 1.0, "compressor": balanced, "decompressor": balanced}
    if parametrization == "spectral":
        return {"local": 1.0, "compressor": balanced, "decompressor": 2.0 * balanced}
    if parametrization == "mup":
        return {"local": float(p), "compressor": float(p), "decompressor": mup_d}
    return {"local": 1.0, "compressor": balanced, "decompressor": mup_d}


def param_kinds(model: nn.Module, parametrization: str = DEFAULT_PARAMETRIZATION) -> dict[int, tuple[str, float]]:
    """``{id(param): (kind, multiplier under parametrization)}`` for every parameter of ``model``."""
    from .layers import PhantomLinear
    check_parametrization(parametrization, "param_kinds")
    kinds: dict[int, tuple[str, float]] = {}
    for module in model.modules():
        if isinstance(module, PhantomLinear):
            name = parametrization
            if name == "auto":
                name = "spectral" if getattr(module, "init_scheme", "balanced") == "spectral" else "balanced"
            mults = layer_multipliers(name, module.in_features, module.ghost_dim, module.group_size)
            for name, kind in (("local_weight", "local"), ("compressor", "compressor"),
                               ("decompressor", "decompressor")):
                param = getattr(module, name)
                if param is not None:
                    kinds[id(param)] = (kind, mults[kind])
    for param in model.parameters():
        if id(param) not in kinds:
            kinds[id(param)] = ("bias" if param.dim() <= 1 else "other", 1.0)
    return kinds


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, *,
                 multipliers: Optional[Mapping[str, float]] = None,
                 parametrization: Optional[str] = None) -> list[dict]:
    """Parameter groups for ``torch.optim.Adam``/``AdamW`` (or any optimizer taking groups).

    Args:
        model: any module; phantom blocks are recognised wherever they sit.
        lr: the base learning rate; group ``t`` gets ``lr * multipliers[t]``.
        weight_decay: for every kind but ``"bias"`` (1-d parameters are not decayed).
        multipliers: ``{kind: multiplier}`` replacing the parametrization's value (1.0 for
            ``"bias"`` and ``"other"``) for every parameter of that kind; unknown kinds or
            non-positive values raise.
        parametrization: one of :data:`PARAMETRIZATIONS`; ``None`` means
            :data:`DEFAULT_PARAMETRIZATION`. Unknown names raise ``ValueError``.

    Returns one group per (kind, multiplier) in :data:`KINDS` order (layers of different
    shapes may get separate factor groups), each
    ``{"params", "lr", "weight_decay", "kind", "lr_mult"}``. Frozen parameters are left out.
    """
    if not lr > 0:
        raise ValueError(f"param_groups: lr must be > 0, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"param_groups: weight_decay must be >= 0, got {weight_decay!r}")
    parametrization = check_parametrization(
        DEFAULT_PARAMETRIZATION if parametrization is None else parametrization)
    given = dict(multipliers or {})
    for kind, value in given.items():
        if kind not in KINDS:
            raise ValueError(f"param_groups: unknown kind {kind!r} in multipliers; kinds are {list(KINDS)}")
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"param_groups: multipliers[{kind!r}] must be a number > 0, got {value!r}")
    kinds = param_kinds(model, parametrization)
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
