"""``phantom_parallel.lr_multipliers``: phantom-aware optimizer groups for DeepSpeed's own optimizer.

When DeepSpeed builds the optimizer from the config's ``"optimizer"`` section (no client
optimizer) from plain parameters (``model_parameters`` ``None`` or a list of tensors), the
adapter hands it :func:`phantom_plugin.param_groups`' groups instead (``"auto"``: its default
parametrization, :data:`phantom_plugin.optim.DEFAULT_PARAMETRIZATION`, ``"balanced"``, which the
parametrisation study kept over per-factor maximal-update rates; ``docs/choosing-k.md``): group ``t`` has
``lr = optimizer.params.lr x lr_mult`` and carries ``"kind"`` and ``"lr_mult"``; every other
hyper-parameter, weight decay included, is the config's, on every group, as plain DeepSpeed
would have it. Frozen parameters are left out.

DeepSpeed's config schedulers that set absolute lrs broadcast one scalar to every group and
would erase the multipliers silently; when the groups carry multipliers (the adapter's, or a
client's built with ``phantom_plugin.param_groups``) their scalar lr parameters are rewritten
into per-group lists scaled by each group's ``lr_mult`` (DeepSpeed's ``_format_param`` takes a
list of ``len(param_groups)``). Schedulers that scale each group's own lr keep the ratios and
are left alone; any other scheduler is refused.

A client optimizer or client parameter groups are the user's: with ``"auto"`` they are kept
(and one line on rank 0 says so), an explicit ``{kind: multiplier}`` object is refused.
Everything that can fail is checked by :func:`plan`, before any process group exists.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional, Sequence

from torch import nn

from ..optim import param_groups
from .config import SECTION, PhantomConfigError, PhantomParallelConfig

__all__ = ["GroupPlan", "plan", "apply", "build", "lr_mults", "scale_scheduler", "SCALED_LR_PARAMS",
           "RATIO_SCHEDULERS"]

FIELD = f"{SECTION}.lr_multipliers"

SCALED_LR_PARAMS = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr"),
    "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr"),
    "OneCycle": ("cycle_min_lr", "cycle_max_lr"),
    "LRRangeTest": ("lr_range_test_min_lr",),
}
"""DeepSpeed schedulers that set absolute lrs, and their lr parameters (scalar or per-group list)."""

RATIO_SCHEDULERS = ("WarmupCosineLR", "StepLR", "MultiStepLR", "ExponentialLR", "LinearLR", "ConstantLR",
                    "PolynomialLR", "CosineAnnealingLR")
"""Schedulers that scale each group's own lr (``CosineAnnealingLR`` only with ``eta_min`` 0)."""

_HOW = ("set \"lr_multipliers\": false in the phantom_parallel section, or use a scheduler that keeps "
        "the groups' lr ratios (" + ", ".join([*SCALED_LR_PARAMS, *RATIO_SCHEDULERS]) + ")")


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """What :func:`initialize` does about optimizer groups.

    ``build``: hand DeepSpeed phantom-aware groups (``base_lr x lr_mult``, ``multipliers``
    explicit or ``None`` for the rule); ``notice``: the line rank 0 prints when ``"auto"`` could
    not be applied (client optimizer or groups).
    """
    build: bool = False
    base_lr: Optional[float] = None
    multipliers: Optional[dict] = None
    notice: Optional[str] = None


def _is_groups(model_parameters) -> bool:
    return bool(model_parameters) and isinstance(model_parameters[0], dict)


def _client_groups(optimizer, model_parameters) -> Optional[list]:
    """The groups a client gave (optimizer instance or param-group dicts), or ``None``."""
    if optimizer is not None and not callable(optimizer):
        return list(getattr(optimizer, "param_groups", []) or [])
    if optimizer is None and _is_groups(model_parameters):
        return model_parameters
    return None


def lr_mults(groups: Sequence[dict]) -> list[float]:
    """Each non-empty group's ``lr_mult`` (1.0 without one), in the order DeepSpeed keeps them."""
    return [float(g.get("lr_mult", 1.0)) for g in groups if len(g["params"])]


def plan(cfg: PhantomParallelConfig, ds: dict, optimizer=None, model_parameters: Optional[list] = None,
         lr_scheduler=None) -> GroupPlan:
    """Decide, and check everything, before any process group exists (raises :class:`PhantomConfigError`).

    ``model_parameters`` must already be a list (or ``None``).
    """
    setting = cfg.lr_multipliers
    explicit = isinstance(setting, dict)
    client = optimizer is not None or _is_groups(model_parameters)
    built_by_deepspeed = not client and bool((ds.get("optimizer") or {}).get("type"))
    if client and explicit:
        what = "an optimizer" if optimizer is not None else "parameter groups (dicts)"
        raise PhantomConfigError(
            f"{FIELD}: {setting} asks for explicit multipliers, but {what} was passed to initialize "
            "(e.g. Hugging Face Trainer's AdamW when the config has no \"optimizer\" section), and the "
            "adapter does not regroup a client's optimizer; add an \"optimizer\" section to the "
            "DeepSpeed config (then DeepSpeed builds it and the adapter groups it), or build the groups "
            "yourself with phantom_plugin.param_groups(converted_model, lr, multipliers=...), or remove "
            "lr_multipliers")
    if built_by_deepspeed and setting != "off":
        lr = ((ds.get("optimizer") or {}).get("params") or {}).get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise PhantomConfigError(
                f"optimizer.params.lr: {lr!r}; {FIELD} ({setting!r}) sets each group's lr to this base lr "
                "x its multiplier, so it needs a number > 0 here; give optimizer.params.lr, or set "
                "\"lr_multipliers\": false")
        out = GroupPlan(build=True, base_lr=float(lr), multipliers=setting if explicit else None)
        active = not explicit or any(v != 1.0 for v in setting.values())
    else:
        groups = _client_groups(optimizer, model_parameters)
        active = groups is not None and any(m != 1.0 for m in lr_mults(groups))
        notice = None
        if client and setting == "auto" and not active:
            notice = (f"{FIELD}: \"auto\" not applied: the optimizer groups were passed in (client "
                      "optimizer or param groups) and are kept as given; to apply the multipliers add "
                      "an \"optimizer\" section to the DeepSpeed config, or build the groups with "
                      "phantom_plugin.param_groups(converted_model, lr)")
        out = GroupPlan(notice=notice)
    if active and lr_scheduler is None:
        _check_scheduler(ds)
    return out


def _scheduler(ds: dict) -> tuple[Optional[str], dict]:
    sched = ds.get("scheduler") or {}
    return sched.get("type"), sched.get("params") or {}


def _check_scheduler(ds: dict) -> None:
    name, params = _scheduler(ds)
    if name is None or name in SCALED_LR_PARAMS:
        return
    if name in RATIO_SCHEDULERS and (name != "CosineAnnealingLR" or not params.get("eta_min")):
        return
    why = ("its eta_min is one absolute lr for every group" if name == "CosineAnnealingLR"
           else "the adapter does not know whether it keeps each group's lr ratio")
    raise PhantomConfigError(
        f"scheduler.type: {name!r} with {FIELD} active (optimizer groups with different lr "
        f"multipliers): {why}, so the multipliers could be erased silently; {_HOW}")


def build(model: nn.Module, model_parameters: Optional[list], group_plan: GroupPlan) -> list[dict]:
    """The phantom-aware groups of ``model_parameters`` (``None``: all of ``model``'s) that require grad.

    Each group: ``params``, ``lr`` (base lr x ``lr_mult``), ``kind``, ``lr_mult``; no other key,
    so the optimizer's own settings (the config's) apply to every group.
    """
    params = list(model.parameters()) if model_parameters is None else list(model_parameters)
    wanted = {id(p) for p in params if p.requires_grad}
    groups, covered = [], set()
    for g in param_groups(model, group_plan.base_lr, multipliers=group_plan.multipliers):
        kept = [p for p in g["params"] if id(p) in wanted]
        covered.update(id(p) for p in kept)
        if kept:
            groups.append({"params": kept, "lr": g["lr"], "kind": g["kind"], "lr_mult": g["lr_mult"]})
    if covered != wanted:
        raise ValueError(f"initialize: {len(wanted - covered)} of model_parameters are not parameters of "
                         f"the model, so {FIELD} cannot group them; pass the model's parameters, or set "
                         "\"lr_multipliers\": false")
    return groups


def _default(scheduler: str, name: str) -> Any:
    """The default of ``name`` in DeepSpeed's ``scheduler`` (``inspect.Parameter.empty`` if none)."""
    from deepspeed.runtime import lr_schedules
    return inspect.signature(getattr(lr_schedules, scheduler)).parameters[name].default


def scale_scheduler(ds: dict, mults: Sequence[float]) -> dict:
    """Rewrite the config scheduler's absolute lrs into per-group lists x ``mults`` (in place).

    Only for the schedulers of :data:`SCALED_LR_PARAMS`, and only when some multiplier is not 1.
    A parameter left out takes DeepSpeed's default (scaled too), except ``WarmupLR``'s
    ``warmup_max_lr``, whose default already is each group's own lr; a list is the user's own
    per-group choice and stays. Returns ``{param: list}`` of what was rewritten.
    """
    name, params = _scheduler(ds)
    if name not in SCALED_LR_PARAMS or all(m == 1.0 for m in mults):
        return {}
    params = ds["scheduler"].setdefault("params", params)
    done = {}
    for key in SCALED_LR_PARAMS[name]:
        value = params.get(key, _default(name, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue        # None (group lrs), a list (per group already), "auto" (DeepSpeed refuses it)
        params[key] = done[key] = [value * m for m in mults]
    return done


def apply(group_plan: GroupPlan, model: nn.Module, ds: dict, optimizer=None,
          model_parameters: Optional[list] = None, lr_scheduler=None) -> Optional[list]:
    """After the conversion: the ``model_parameters`` to pass to DeepSpeed (the phantom-aware
    groups when :func:`plan` said so), with the config scheduler scaled per group (``ds`` in place)."""
    if group_plan.build:
        model_parameters = build(model, model_parameters, group_plan)
        groups = model_parameters
    else:
        groups = _client_groups(optimizer, model_parameters)
    if groups and lr_scheduler is None:
        scale_scheduler(ds, lr_mults(groups))
    return model_parameters
