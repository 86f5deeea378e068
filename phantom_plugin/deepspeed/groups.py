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


def build_groups(size: int) -> PhantomGroups:
    """Create every phantom and data-parallel group (collective: call on all ranks)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"phantom_parallel.size={size} does not divide the world size {world}")
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
