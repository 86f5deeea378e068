"""``initialize``: ``deepspeed.initialize`` with the config's ``phantom_parallel`` section applied.

With the plugin installed this runs for every ``deepspeed.initialize`` call whose config has the
section (the import hook, :mod:`phantom_plugin.integrations.deepspeed_autoload`), Hugging Face ``Trainer`` and
Accelerate included; calling it directly is the explicit form. Order of work (each step only
after the previous succeeded on this rank):

1. read the DeepSpeed config (``config`` / ``config_params`` / ``args.deepspeed_config``) and
   validate the section and its interplay with the world size and other sections -- no process
   group exists yet, so a bad config fails fast on every rank and nothing can hang;
2. without an enabled section: return ``deepspeed.initialize(...)`` with the arguments untouched;
3. ``deepspeed.init_distributed``; build the phantom and data groups and a :class:`PhantomMPU`
   (or, for a ``PipelineModule``, take them from its topology and switch off partitioned
   stage-boundary activations);
4. a model built under ``deepspeed.zero.Init`` (partitioned over the whole world) is gathered
   into full parameters first (:mod:`.zero3`); convert the matching modules (:func:`phantom_plugin.convert.convert_modules`), and remap
   ``model_parameters`` and a ready (state-free) optimizer to the converted parameters, each new
   parameter in its old one's group (:mod:`.remap`). A model converted by an earlier call (an
   evaluation or batch-size retry of ``Trainer``) is not converted again: its groups are reused;
   with ``lr_multipliers`` and DeepSpeed's config-built optimizer, ``model_parameters`` become
   phantom-aware groups (lr x ``lr_mult``) and the config scheduler's absolute lrs are scaled
   per group (:mod:`.lr_groups`, whose checks run in step 1);
5. fit ``train_batch_size`` to the data-parallel size when it was computed from the whole world
   (Hugging Face's ``micro x accumulation x world``), then ``deepspeed.initialize(..., mpu=...)``;
   attach ``engine.phantom`` (a :class:`PhantomRun`) and, with ``log_interval > 0``, the monitor
   :class:`StepLogger`; wrap ``engine.save_checkpoint`` / ``load_checkpoint`` so that a
   checkpoint carries its phantom layout and loads only at that layout (:mod:`.checkpoint`);
   give the engine its route (below).

Routing (the rule): each engine owns a :class:`~.routing.DeepSpeedRoute` (``deepspeed.comm``,
the section's ``comm_dtype`` on the wire), ``engine.phantom.route``, and it is active only while
the engine runs phantom code for its model. Inside ``engine.forward`` (``engine(x)``),
``engine.backward`` and ``engine.step`` -- ``train_batch`` and ``eval_batch`` for a pipeline
engine --, ``save_checkpoint`` / ``load_checkpoint`` (instance attributes wrapping the engine's
own methods, as the monitor and the checkpoint layout do) and the dense export of :mod:`.export`
(:func:`routed`), every phantom collective goes through ``deepspeed.comm``, so DeepSpeed's
``comms_logger`` sees it. Outside them nothing is routed: another engine, a plain model or a
benchmark in the same process uses torch.distributed. The conversion of step 4 runs before the
engine exists, unrouted (its exchanges in full precision whatever ``comm_dtype`` says). A backward
started by ``loss.backward()`` itself instead of ``engine.backward`` runs unrouted too.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import re
import weakref
from typing import Any, Optional, Sequence

import deepspeed
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule
from torch import nn

from .. import comm
from ..convert import Conversion, PhantomEdgeLinear, check_convertible, convert_modules
from .config import PhantomConfigError, PhantomParallelConfig, autotp_patterns, check_run, load_ds_config, load_section
from .checkpoint import attach as attach_checkpoints
from .config import world_size_from_env
from .groups import PhantomGroups, PhantomMPU, build_groups
from . import lr_groups
from .monitor import StepLogger
from .pipe import count_replicated_once, guard_partitioning, pipeline_groups
from .remap import check_optimizer_fresh, remap_optimizer, remap_parameters
from .routing import COMM_DTYPES, DeepSpeedRoute
from .zero3 import is_partitioned, materialize

__all__ = ["initialize", "PhantomRun", "routed"]

log = logging.getLogger("phantom_plugin.deepspeed")
_RUNS: "weakref.WeakKeyDictionary[nn.Module, PhantomRun]" = weakref.WeakKeyDictionary()
"""Models this process converted, with what was done: a second ``initialize`` reuses it."""


@dataclasses.dataclass
class PhantomRun:
    """What :func:`initialize` did: ``engine.phantom``."""
    config: PhantomParallelConfig
    groups: PhantomGroups
    conversions: list[Conversion]
    logger: Optional[StepLogger] = None
    route: Optional[DeepSpeedRoute] = None
    """The engine's backend for phantom collectives (see the module docstring)."""

    def describe(self) -> str:
        lines = [f"phantom_parallel: size={self.config.size} ghost_neurons={self.config.ghost_neurons} "
                 f"phantom ranks {list(self.groups.phantom_ranks)}, data ranks {list(self.groups.data_ranks)}, "
                 f"{len(self.conversions)} module(s) converted"]
        for c in self.conversions:
            err = "" if c.approx_error is None else f", SVD rel. error {c.approx_error:.3g}"
            lines.append(f"  {c.name or '<root>'} ({c.kind}: {', '.join(c.children)}){err}")
        return "\n".join(lines)


def _resolve_config(args, config, config_params):
    """(DeepSpeed config dict, args to pass on) -- the config is always passed on as ``config``."""
    if config is None and config_params is not None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if from_args is not None:
        if config is not None:
            raise ValueError("initialize: a config was passed both in args.deepspeed_config and as "
                             "config=; pass one")
        args = copy.copy(args)
        args.deepspeed_config = None
        config = from_args
    if config is None:
        raise ValueError("initialize: no DeepSpeed config; pass --deepspeed_config (args) or config=")
    return copy.deepcopy(load_ds_config(config)), args


def _deepspeed_initialize():
    """The real ``deepspeed.initialize``, without the plugin's import-hook wrapper around it."""
    fn = deepspeed.initialize
    while getattr(fn, "_phantom_plugin_wrapper", False):
        fn = fn.__wrapped__
    return fn


def _fit_train_batch(ds: dict, world: int, size: int) -> None:
    """``train_batch_size = micro x accumulation x world`` -> ``... x data-parallel size`` (in place).

    With an ``mpu`` DeepSpeed requires ``train_batch_size == micro x accumulation x dp size``;
    Hugging Face fills it with the whole world size, too large by the phantom size.
    """
    tb, mb = ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps", 1)
    if size > 1 and all(isinstance(v, int) for v in (tb, mb, gas)) and tb == mb * gas * world:
        ds["train_batch_size"] = mb * gas * (world // size)
        log.info("phantom_parallel: train_batch_size %d -> %d (micro %d x accumulation %d x "
                 "data-parallel %d)", tb, ds["train_batch_size"], mb, gas, world // size)


def _previous_run(model: nn.Module, cfg: PhantomParallelConfig) -> Optional["PhantomRun"]:
    """What an earlier ``initialize`` did to ``model``, or ``None`` if it is unconverted."""
    run = _RUNS.get(model)
    if run is not None:
        if run.config != cfg:
            raise PhantomConfigError(
                "initialize: this model was already converted with a different phantom_parallel "
                f"section ({run.config.model_dump()}); call initialize again with the same section, "
                "or build a fresh model")
        return run
    if any(isinstance(m, PhantomEdgeLinear) for m in model.modules()):
        raise PhantomConfigError(
            "initialize: the model already holds phantom layers converted outside this process's "
            "initialize (a copy of a converted model?); pass the dense model, or the converted "
            "model itself")
    return None


def initialize(args: Any = None, model: nn.Module = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None,
               distributed_port: int = deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT,
               mpu=None, dist_init_required: Optional[bool] = None, collate_fn=None, config=None,
               mesh_param=None, config_params=None):
    """Same arguments and return value as ``deepspeed.initialize``; see the module docstring."""
    passthrough = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                       training_data=training_data, lr_scheduler=lr_scheduler,
                       distributed_port=distributed_port, mpu=mpu, dist_init_required=dist_init_required,
                       collate_fn=collate_fn, config=config, mesh_param=mesh_param,
                       config_params=config_params)
    ds, args = _resolve_config(args, config, config_params)
    cfg = load_section(ds)
    if cfg is None or not cfg.enabled:
        return _deepspeed_initialize()(**passthrough)

    # --- 1. every check that needs no process group ------------------------------------------
    if model is None:
        raise ValueError("initialize: model is required")
    pipeline = isinstance(model, PipelineModule)
    if mpu is not None:
        raise PhantomConfigError("initialize: mpu must be None with phantom_parallel; the plugin "
                                 "builds the phantom and data-parallel groups itself")
    if optimizer is not None and not callable(optimizer):
        check_optimizer_fresh(optimizer)
    if model_parameters is not None:
        model_parameters = list(model_parameters)
    group_plan = lr_groups.plan(cfg, ds, optimizer, model_parameters, lr_scheduler)
    stages = model.num_stages if pipeline else 1
    world = world_size_from_env()
    check_run(cfg, ds, world, pipeline=pipeline, pipe_stages=stages)
    if pipeline:
        ds = guard_partitioning(ds)
    else:
        _fit_train_batch(ds, world, cfg.size)
    before = {id(p): n for n, p in model.named_parameters()}
    if _RUNS.get(model) is None and any(is_partitioned(p) for p in model.parameters()):
        materialize(model)      # built under zero.Init over the world: full weights first (collective)
    previous = _previous_run(model, cfg)
    if previous is None:
        _check_convertible(model, cfg, pipeline, autotp_patterns(ds))

    # --- 2. groups, conversion, routing -------------------------------------------------------
    deepspeed.init_distributed(distributed_port=distributed_port,
                               dist_init_required=dist_init_required)
    if previous is not None:
        groups, conversions = previous.groups, previous.conversions
    elif pipeline:
        groups = pipeline_groups(model, cfg.size)
    else:
        groups = build_groups(cfg.size)
    ds_mpu = None if pipeline else PhantomMPU(groups)
    if previous is None:     # unrouted: conversion's exchanges in full precision, whatever comm_dtype says
        conversions = _convert(model, cfg, groups, pipeline)
        model_parameters = remap_parameters(model_parameters, model, before)
        if optimizer is not None and not callable(optimizer):
            remap_optimizer(optimizer, model, before)
        if pipeline:
            count_replicated_once(model)
    model_parameters = lr_groups.apply(group_plan, model, ds, optimizer, model_parameters, lr_scheduler)

    # --- 3. DeepSpeed ---------------------------------------------------------------------------
    out = _deepspeed_initialize()(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=distributed_port,
        mpu=ds_mpu, dist_init_required=dist_init_required, collate_fn=collate_fn, config=ds,
        mesh_param=mesh_param)
    engine = out[0]
    _check_autotp_groups(engine, groups)
    wire = None if cfg.comm_dtype is None else COMM_DTYPES[cfg.comm_dtype]
    run = PhantomRun(cfg, groups, conversions, route=DeepSpeedRoute(deepspeed.comm, wire))
    _RUNS[model] = run
    if cfg.log_interval > 0:
        run.logger = StepLogger(engine, cfg.log_interval)
    engine.phantom = run
    attach_checkpoints(engine, run)
    _route_calls(engine, run.route)
    if engine.global_rank == 0:
        log.info(run.describe())
        print(run.describe(), flush=True)
        if group_plan.notice:
            log.info(group_plan.notice)
            print(group_plan.notice, flush=True)
    return out


def _check_autotp_groups(engine, groups: PhantomGroups) -> None:
    """AutoTP replaced the ``mpu`` with its own groups: its tensor group must be the phantom group."""
    mpu = getattr(engine, "mpu", None)
    if mpu is None or isinstance(mpu, PhantomMPU) or not hasattr(mpu, "get_tensor_model_parallel_group"):
        return
    import torch.distributed as dist
    tp = tuple(dist.get_process_group_ranks(mpu.get_tensor_model_parallel_group()))
    if tp != tuple(groups.phantom_ranks):
        raise PhantomConfigError(
            f"tensor_parallel.autotp_size: AutoTP built the tensor group {list(tp)}, but the phantom "
            f"group of this rank is {list(groups.phantom_ranks)}; both must be the same ranks "
            "(consecutive, size ranks each): set autotp_size equal to phantom_parallel.size")


def _convert(model: nn.Module, cfg: PhantomParallelConfig, groups: PhantomGroups,
             pipeline: bool) -> list[Conversion]:
    return convert_modules(model, cfg.target_modules, ghost_dim=cfg.ghost_neurons,
                           group=groups.phantom, init="dense" if cfg.init_from_dense else "random",
                           seed=cfg.seed, warn_unmatched=not pipeline)


def _check_convertible(model: nn.Module, cfg: PhantomParallelConfig, pipeline: bool,
                       autotp: Sequence[str] = ()) -> None:
    """Every layout and size error, "nothing matched", and AutoTP patterns that would shard a
    phantom MLP, before any process group exists."""
    try:
        names = check_convertible(model, cfg.target_modules, size=cfg.size, ghost_dim=cfg.ghost_neurons)
    except ValueError as e:
        raise PhantomConfigError(f"phantom_parallel.target_modules: {e}") from None
    for pname, _ in model.named_parameters():
        if any(pname.startswith(n + ".") for n in names):
            hit = [pat for pat in autotp if re.search(pat, pname)]
            if hit:
                raise PhantomConfigError(
                    f"tensor_parallel.partition_config: pattern {hit[0]!r} matches '{pname}', a "
                    f"layer of the phantom MLP '{next(n for n in names if pname.startswith(n + '.'))}'"
                    "; AutoTP must shard attention only: drop the MLP layers from its layer_specs")
    if not names and not pipeline:
        raise PhantomConfigError(
            f"phantom_parallel.target_modules: {cfg.target_modules} matches no module of "
            f"{type(model).__name__}, so nothing would be phantom-parallel; name its MLP modules "
            r'(e.g. ["mlp"] for Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX, Falcon, BLOOM, Phi; '
            r'["decoder\\.layers\\.\\d+$"] for OPT; list them with [n for n, _ in '
            'model.named_modules()]) or set "enabled": false')


def forget(model: nn.Module) -> None:
    """Drop the record of ``model``'s conversion (after :func:`.export.to_dense` made it dense)."""
    _RUNS.pop(model, None)


_ROUTED_CALLS = ("forward", "backward", "step", "save_checkpoint", "load_checkpoint")
_ROUTED_PIPE_CALLS = ("train_batch", "eval_batch", "save_checkpoint", "load_checkpoint")


def _route_calls(engine, route: DeepSpeedRoute) -> None:
    """Wrap the engine's model-running methods (instance attributes) to run under ``route``."""
    for name in _ROUTED_PIPE_CALLS if isinstance(engine, PipelineEngine) else _ROUTED_CALLS:
        inner = getattr(engine, name)
        if getattr(inner, "_phantom_route", None) is not None:
            continue
        setattr(engine, name, _under(route, inner))


def _under(route: DeepSpeedRoute, inner):
    @functools.wraps(inner)
    def call(*args, **kwargs):
        with comm.use_backend(route):
            return inner(*args, **kwargs)
    call._phantom_route = route
    return call


def routed(engine) -> contextlib.AbstractContextManager:
    """``with routed(engine):`` issues the block's phantom collectives through ``engine``'s route
    (none for an engine or model without one)."""
    route = getattr(getattr(engine, "phantom", None), "route", None)
    return contextlib.nullcontext() if route is None else comm.use_backend(route)
