"""``initialize``: ``deepspeed.initialize`` with the config's ``phantom_parallel`` section applied.

Order of work (each step only after the previous succeeded on this rank):

1. read the DeepSpeed config (``config`` / ``config_params`` / ``args.deepspeed_config``) and
   validate the section and its interplay with the world size and other sections -- no process
   group exists yet, so a bad config fails fast on every rank and nothing can hang;
2. without an enabled section: return ``deepspeed.initialize(...)`` with the arguments untouched;
3. ``deepspeed.init_distributed``; build the phantom and data groups and a :class:`PhantomMPU`
   (or, for a ``PipelineModule``, take them from its topology and switch off partitioned
   stage-boundary activations);
4. route the plugin's collectives through ``deepspeed.comm`` (for the rest of the process);
5. convert the matching modules (:func:`phantom_plugin.convert.convert_modules`) -- before the
   optimizer exists, and remap ``model_parameters`` to the converted parameters;
6. ``deepspeed.initialize(..., mpu=...)``; attach ``engine.phantom`` (a :class:`PhantomRun`) and,
   with ``log_interval > 0``, the monitor :class:`StepLogger`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Optional

import deepspeed
from deepspeed.runtime.pipe.module import PipelineModule
from torch import nn

from .. import comm
from ..convert import Conversion, convert_modules
from .config import PhantomConfigError, PhantomParallelConfig, check_run, load_ds_config, load_section
from .config import world_size_from_env
from .groups import PhantomGroups, PhantomMPU, build_groups
from .monitor import StepLogger
from .pipe import count_replicated_once, guard_partitioning, pipeline_groups
from .routing import COMM_DTYPES, DeepSpeedRoute

__all__ = ["initialize", "PhantomRun"]

log = logging.getLogger("phantom_plugin.deepspeed")
_ROUTE = None   # the use_backend context kept open for the process


@dataclasses.dataclass
class PhantomRun:
    """What :func:`initialize` did: ``engine.phantom``."""
    config: PhantomParallelConfig
    groups: PhantomGroups
    conversions: list[Conversion]
    logger: Optional[StepLogger] = None

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


def _remap_parameters(model_parameters, model: nn.Module, before: dict[int, str]):
    """Replace parameters of converted layers in a user list by the parameters that replaced them."""
    if model_parameters is None:
        return None
    items = list(model_parameters)
    now = {id(p) for p in model.parameters()}
    new_by_module: dict[str, list] = {}
    for name, p in model.named_parameters():
        new_by_module.setdefault(name.rsplit(".", 1)[0], []).append(p)

    def remap(params):
        out, seen = [], set()
        for p in params:
            if id(p) in now or id(p) not in before:
                cand = [p]
            else:    # a dense weight/bias that was converted: its layer's new parameters
                prefix = before[id(p)].rsplit(".", 1)[0]
                cand = [q for n, qs in new_by_module.items() if n.startswith(prefix + ".") for q in qs]
            for q in cand:
                if id(q) not in seen:
                    seen.add(id(q))
                    out.append(q)
        return out

    if items and isinstance(items[0], dict):
        return [{**g, "params": remap(g["params"])} for g in items]
    return remap(items)


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
        return deepspeed.initialize(**passthrough)

    # --- 1. every check that needs no process group ------------------------------------------
    if model is None:
        raise ValueError("initialize: model is required")
    pipeline = isinstance(model, PipelineModule)
    if mpu is not None:
        raise PhantomConfigError("initialize: mpu must be None with phantom_parallel; the plugin "
                                 "builds the phantom and data-parallel groups itself")
    if optimizer is not None and not callable(optimizer):
        raise PhantomConfigError(
            "initialize: an optimizer instance was built on the dense parameters, which conversion "
            "replaces; pass the optimizer in the config's \"optimizer\" section or as a callable "
            "(lambda params: torch.optim.AdamW(params, ...))")
    stages = model.num_stages if pipeline else 1
    check_run(cfg, ds, world_size_from_env(), pipeline=pipeline, pipe_stages=stages)
    if pipeline:
        ds = guard_partitioning(ds)
    before = {id(p): n for n, p in model.named_parameters()}

    # --- 2. groups, routing, conversion -------------------------------------------------------
    deepspeed.init_distributed(distributed_port=distributed_port,
                               dist_init_required=dist_init_required)
    if pipeline:
        groups, ds_mpu = pipeline_groups(model, cfg.size), None
    else:
        groups = build_groups(cfg.size)
        ds_mpu = PhantomMPU(groups)
    _route_collectives(cfg)
    conversions = convert_modules(model, cfg.target_modules, ghost_dim=cfg.ghost_neurons,
                                  group=groups.phantom,
                                  init="dense" if cfg.init_from_dense else "random", seed=cfg.seed,
                                  warn_unmatched=not pipeline)
    model_parameters = _remap_parameters(model_parameters, model, before)
    if pipeline:
        count_replicated_once(model)

    # --- 3. DeepSpeed ---------------------------------------------------------------------------
    out = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                               model_parameters=model_parameters, training_data=training_data,
                               lr_scheduler=lr_scheduler, distributed_port=distributed_port,
                               mpu=ds_mpu, dist_init_required=dist_init_required,
                               collate_fn=collate_fn, config=ds, mesh_param=mesh_param)
    engine = out[0]
    run = PhantomRun(cfg, groups, conversions)
    if cfg.log_interval > 0:
        run.logger = StepLogger(engine, cfg.log_interval)
    engine.phantom = run
    if engine.global_rank == 0:
        log.info(run.describe())
        print(run.describe(), flush=True)
    return out


def _route_collectives(cfg: PhantomParallelConfig) -> None:
    """Send every plugin collective through ``deepspeed.comm`` from now on."""
    global _ROUTE
    if _ROUTE is not None:
        _ROUTE.__exit__(None, None, None)
    wire = None if cfg.comm_dtype is None else COMM_DTYPES[cfg.comm_dtype]
    _ROUTE = comm.use_backend(DeepSpeedRoute(deepspeed.comm, wire))
    _ROUTE.__enter__()
