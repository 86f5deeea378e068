"""Process groups of a phantom x data-parallel run, and the ``mpu`` object DeepSpeed reads them from.

Layout: phantom varies fastest. With world size ``W`` and phantom size ``p``, phantom group ``g``
is ranks ``[g*p, ..., g*p + p-1]`` and data-parallel group ``j`` is ranks ``[j, j+p, j+2p, ...]``.

:class:`PhantomMPU` answers the methods DeepSpeed calls on an ``mpu`` (engine, ZeRO, grad-norm,
checkpointing): the "model"/"tensor"/"slice" parallel group is the phantom group, the data
group the data-parallel one, and the pipeline has one stage. It deliberately has no
``get_sequence_*`` / ``initialize_sequence_parallel``: DeepSpeed switches to Ulysses code paths
when it finds them. No group is ever ``WORLD`` (``deepspeed.comm.get_all_ranks_from_group(WORLD)``
never returns); ranks are read with ``torch.distributed.get_process_group_ranks``.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import torch.distributed as dist

__all__ = ["PhantomGroups", "build_groups", "PhantomMPU"]


@dataclasses.dataclass(frozen=True)
class PhantomGroups:
    """This rank's groups. ``phantom``/``data`` are process groups, ``*_ranks`` their global ranks."""
    phantom: dist.ProcessGroup
    data: dist.ProcessGroup
    single: dist.ProcessGroup          # this rank alone: the (trivial) pipeline group
    phantom_ranks: tuple[int, ...]
    data_ranks: tuple[int, ...]


def _ranks_per_node() -> Optional[int]:
    """Ranks per node as the launcher says (torchrun: ``LOCAL_WORLD_SIZE``, deepspeed: ``LOCAL_SIZE``)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def build_groups(size: int) -> PhantomGroups:
    """Create every phantom and data-parallel group (collective: call on all ranks).

    Launchers number ranks node by node, so consecutive phantom groups stay inside a node
    whenever ``size`` divides the ranks per node (the phantom collectives are the frequent
    ones); otherwise a warning says which groups cross nodes.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"phantom_parallel.size={size} does not divide the world size {world}")
    per_node = _ranks_per_node()
    if rank == 0 and per_node and per_node < world and per_node % size:
        warnings.warn(f"phantom_parallel.size={size} does not divide the {per_node} ranks per node: "
                      "some phantom groups span two nodes (their ghost exchanges then cross the "
                      f"network); choose a size that divides {per_node}", stacklevel=2)
    phantom = data = None
    for g in range(world // size):
        ranks = list(range(g * size, (g + 1) * size))
        pg = dist.new_group(ranks)
        if rank in ranks:
            phantom, phantom_ranks = pg, tuple(ranks)
    for j in range(size):
        ranks = list(range(j, world, size))
        pg = dist.new_group(ranks)
        if rank in ranks:
            data, data_ranks = pg, tuple(ranks)
    single = dist.new_group([rank], use_local_synchronization=True)
    return PhantomGroups(phantom, data, single, phantom_ranks, data_ranks)


class PhantomMPU:
    """The ``mpu`` DeepSpeed expects (Megatron's method names), backed by :class:`PhantomGroups`."""

    def __init__(self, groups: PhantomGroups):
        self.groups = groups

    # data parallel
    def get_data_parallel_group(self):
        return self.groups.data

    def get_data_parallel_world_size(self) -> int:
        return len(self.groups.data_ranks)

    def get_data_parallel_rank(self) -> int:
        return self.groups.data_ranks.index(dist.get_rank())

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(dist.get_process_group_ranks(self.groups.data))

    # model / tensor / slice parallel = the phantom group
    def get_model_parallel_group(self):
        return self.groups.phantom

    def get_model_parallel_world_size(self) -> int:
        return len(self.groups.phantom_ranks)

    def get_model_parallel_rank(self) -> int:
        return self.groups.phantom_ranks.index(dist.get_rank())

    def get_model_parallel_src_rank(self) -> int:
        return self.groups.phantom_ranks[0]

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank
    get_slice_parallel_group = get_model_parallel_group
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_rank = get_model_parallel_rank

    # a single pipeline stage
    def get_pipe_parallel_group(self):
        return self.groups.single

    def get_pipe_parallel_world_size(self) -> int:
        return 1

    def get_pipe_parallel_rank(self) -> int:
        return 0

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
