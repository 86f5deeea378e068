"""Accelerate (and so Hugging Face ``Trainer``): batches sharded by data-parallel rank.

Accelerate shards a data loader by process index unless the DeepSpeed device mesh it keeps
(``AcceleratorState.ds_device_mesh``) has a ``"tp"`` dimension, as it sets for AutoTP: then the
ranks of one ``"tp"`` group get the same batches. The ranks of one phantom group must too, so
when the config's ``phantom_parallel`` section is enabled :func:`shard_by_data_rank` sets that
mesh to ``(data, phantom)`` -- phantom ranks consecutive, as :func:`.groups.build_groups` makes
them -- before Accelerate prepares anything. The import hook calls it from
``Accelerator._prepare_deepspeed`` (which Accelerate runs for data loaders as well as models).
There too, an explicit ``"lr_multipliers": "auto"`` is removed (the default, same meaning)
before Accelerate's own walk over the config, which raises on any ``"auto"`` it cannot fill.
"""
from __future__ import annotations

from .config import SECTION, PhantomConfigError, check_run, load_section

__all__ = ["shard_by_data_rank", "keep_section_autos"]


def keep_section_autos(ds_config: dict) -> None:
    """Drop ``"lr_multipliers": "auto"`` from the section (in place): it is the default anyway.

    Accelerate's ``deepspeed_config_process`` walks the whole config and raises on every
    ``"auto"`` it has no value for (``phantom_parallel.lr_multipliers not found in kwargs``).
    """
    section = ds_config.get(SECTION)
    if isinstance(section, dict) and section.get("lr_multipliers") == "auto":
        del section["lr_multipliers"]


def shard_by_data_rank(accelerator, ds_config: dict) -> None:
    """Give ``accelerator``'s state a ``("dp", "tp")`` mesh whose ``"tp"`` axis is the phantom group
    (and :func:`keep_section_autos`)."""
    keep_section_autos(ds_config)
    cfg = load_section(ds_config)
    if cfg is None or not cfg.enabled:
        return
    state = accelerator.state
    world = accelerator.num_processes
    check_run(cfg, ds_config, world, pipeline=False)
    mesh = getattr(state, "ds_device_mesh", None)
    if mesh is not None:
        names = tuple(mesh.mesh_dim_names or ())
        if "tp" in names and mesh["tp"].size() == cfg.size:
            return
        raise PhantomConfigError(
            f"phantom_parallel.size: Accelerate already holds a device mesh {names} whose \"tp\" "
            f"axis is not the phantom group of {cfg.size} ranks; remove the other model-parallel "
            "setting")
    from torch.distributed.device_mesh import init_device_mesh
    if world == cfg.size:
        shape, names = (cfg.size,), ("tp",)
    else:
        shape, names = (world // cfg.size, cfg.size), ("dp", "tp")
    state.ds_device_mesh = init_device_mesh(accelerator.device.type, shape, mesh_dim_names=names)
