"""Phantom layers inside a DeepSpeed ``PipelineModule``.

The phantom group is the topology's model axis: build the module with :func:`phantom_topology`
(``PipeModelDataParallelTopology(pipe, model=size, data=rest)``, model fastest, as in a plain
phantom x data run) and pass it to :func:`phantom_plugin.deepspeed.initialize`, which converts the
matching layers of this stage with the grid's slice group (``get_model_parallel_group`` there
spans pipe x model and is not the phantom group).

Stage boundaries: DeepSpeed's ``pipeline.pipe_partitioned`` / ``grad_partitioned`` (default
true) send each model rank only ``1/size`` of a boundary activation and all-gather it on the
other side, assuming it is identical across the model axis. A phantom-sharded activation
(``[*, n/p]``, different on each model rank) is then silently corrupted. :func:`guard_partitioning`
turns both off (each model rank then sends its whole tensor to the same model rank of the next
stage, correct for replicated and sharded boundaries alike); an explicit ``true`` is rejected by
:func:`phantom_plugin.deepspeed.config.check_run`.

Grad norm: DeepSpeed's fp32 clipping (``runtime/utils.py: clip_grad_norm_``) counts an untagged
parameter only where ``mpu.get_model_parallel_rank() == 0``; on a pipeline grid that is the rank
in the whole pipe x model group, so replicated parameters of every stage but the first are never
counted and clipping uses a too-small norm (measured: losses drift from the reference by 1e-3
within five steps). :func:`count_replicated_once` marks them ``model_parallel=True`` on model
rank 0 of each stage, which every DeepSpeed norm (fp32, ZeRO-1/2, bf16) then counts exactly once.
"""
from __future__ import annotations

import copy
from typing import Union

from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from .config import PhantomConfigError, check_run, load_ds_config, load_section, world_size_from_env
from .groups import PhantomGroups

__all__ = ["phantom_topology", "pipeline_groups", "guard_partitioning", "count_replicated_once"]


def phantom_topology(config: Union[str, dict], num_stages: int) -> PipeModelDataParallelTopology:
    """``pipe=num_stages x data x model=size`` topology for the config's ``phantom_parallel`` section.

    Validates the section first (no process group needed). Without an enabled section the model
    axis has size 1.
    """
    ds = load_ds_config(config)
    cfg = load_section(ds)
    world = world_size_from_env()
    if cfg is None or not cfg.enabled:
        return PipeModelDataParallelTopology(num_pp=num_stages, num_mp=1, num_dp=world // num_stages)
    check_run(cfg, ds, world, pipeline=True, pipe_stages=num_stages)
    return PipeModelDataParallelTopology(num_pp=num_stages, num_mp=cfg.size,
                                         num_dp=world // (num_stages * cfg.size))


def pipeline_groups(module, size: int) -> PhantomGroups:
    """The phantom (slice) and data groups of ``module``'s grid; checks its model axis is ``size``."""
    grid = module.mpu()
    mp = grid.get_slice_parallel_world_size()
    if mp != size:
        raise PhantomConfigError(
            f"phantom_parallel.size: {size}, but the PipelineModule's topology has a model axis of "
            f"{mp}; build it with topology=phantom_plugin.deepspeed.phantom_topology(config, stages)")
    import torch.distributed as dist
    phantom, data = grid.get_slice_parallel_group(), grid.get_data_parallel_group()
    return PhantomGroups(phantom, data, grid.get_pipe_parallel_group(),
                         tuple(dist.get_process_group_ranks(phantom)),
                         tuple(dist.get_process_group_ranks(data)))


def guard_partitioning(ds: dict) -> dict:
    """A copy of the DeepSpeed config with ``pipe_partitioned`` and ``grad_partitioned`` false."""
    out = copy.deepcopy(ds)
    pipe = out.setdefault("pipeline", {})
    pipe["pipe_partitioned"] = False
    pipe["grad_partitioned"] = False
    return out


def count_replicated_once(module) -> int:
    """Mark this stage's replicated parameters as counted by its model-rank-0 (see module docstring).

    Returns how many parameters were marked (0 on model ranks other than 0).
    """
    if module.mpu().get_slice_parallel_rank() != 0:
        return 0
    marked = 0
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = True
            marked += 1
    return marked
