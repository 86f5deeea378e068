"""``megatron.core.dist_checkpointing`` for models with phantom MLPs.

Phantom parameters are saved TP-sharded on axis 0 (each rank's block stacked in rank order) by
:meth:`PhantomMLP.sharded_state_dict`, with the layout ``{phantom_tp_size, ghost_dim, ...}`` as
the module's extra state. A save and load at the same TP size round-trips exactly.

Their global shapes depend on the TP size ``p`` (fc2's ``local_weight`` is ``[h, ffn/p]``), so a
checkpoint cannot load at another ``p``: megatron would stop at "Global shape mismatch".
:func:`check_checkpoint` reads only the checkpoint's metadata file (no collective) and raises
:class:`PhantomCheckpointError` naming both TP sizes and the way through: load at the saved size,
:func:`~phantom_plugin.megatron.to_dense`, save a stock checkpoint (megatron reshards
those), load it at the new size into the stock model and
:func:`~phantom_plugin.megatron.convert_to_phantom`. :func:`load_checkpoint` checks, then loads.
"""
from __future__ import annotations

import os
from typing import Optional

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException, maybe_load_config
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values

from .mlp import PhantomCheckpointError, PhantomMLP

__all__ = ["check_checkpoint", "load_checkpoint", "save_checkpoint", "PhantomCheckpointError"]

_RESHARD = ("load it at the saved size, call phantom_plugin.megatron.to_dense(model) and save "
            "a stock checkpoint (megatron reshards those), then at the new size load it into the stock "
            "model and call convert_to_phantom(model, ghost_dim=k)")


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _single(model, who: str):
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"{who}: pass one model chunk at a time (virtual pipeline chunks need "
                             "megatron's model{i} key prefixes, as Megatron-LM's checkpointing adds)")
        return model[0]
    return model


def check_checkpoint(model, checkpoint_dir: str, *, metadata: Optional[dict] = None) -> None:
    """Raise :class:`PhantomCheckpointError` if ``checkpoint_dir`` cannot load into ``model``'s phantom MLPs.

    Reads only the checkpoint's metadata files (tensor names and global shapes; no tensor data, no
    collective, so any subset of ranks may call it). Names the saved and the current TP size (and
    ghost_dim), or says the checkpoint holds dense MLPs; a directory that is not a megatron
    distributed checkpoint raises megatron's ``CheckpointingException``.
    """
    owner = {}                                                # id(param) -> its PhantomMLP
    for chunk in _chunks(model):
        for m in chunk.modules():
            if isinstance(m, PhantomMLP):
                owner.update({id(p): m for p in m.parameters()})
    if not owner:
        return
    saved = _saved_shapes(checkpoint_dir)
    tensors = {}
    for chunk in _chunks(model):
        tensors.update({sh.key: sh for sh in nested_values(chunk.sharded_state_dict(metadata=metadata))
                        if isinstance(sh, ShardedTensor) and id(sh.data) in owner})
    for key, sh in sorted(tensors.items(), key=lambda kv: (not kv[0].endswith("local_weight"), kv[0])):
        mlp = owner[id(sh.data)]
        base = key[: key.rindex(".") + 1]                            # "...mlp.linear_fc1."
        if key not in saved:
            if base + "weight" in saved:
                raise PhantomCheckpointError(
                    f"checkpoint {checkpoint_dir} holds dense (tensor-parallel) MLP weights at "
                    f"'{base}weight', not phantom ones: build the stock model, load it there and call "
                    f"phantom_plugin.megatron.convert_to_phantom(model, ghost_dim={mlp.ghost_dim})")
            raise PhantomCheckpointError(f"checkpoint {checkpoint_dir} has no '{key}' for this model's "
                                         "phantom MLP (was it saved at tensor-parallel size 1?)")
        if saved[key] == tuple(sh.global_shape):
            continue
        p_saved, k_saved = _saved_layout(saved, key[: key.rindex("linear_fc")], mlp.ffn_hidden_size)
        raise PhantomCheckpointError(
            f"checkpoint {checkpoint_dir} holds phantom MLPs saved at tensor-parallel size {p_saved} "
            f"with ghost_dim {k_saved}, but this model runs at tensor-parallel size {mlp.group_size} with "
            f"ghost_dim {mlp.ghost_dim} ('{key}': saved {saved[key]}, expected "
            f"{tuple(sh.global_shape)}). Phantom blocks depend on both. To change the TP size, "
            f"{_RESHARD}; to change ghost_dim, call to_dense(model) then convert_to_phantom at the same size")


def _saved_shapes(checkpoint_dir: str) -> dict:
    """``{key: global shape}`` of every tensor a megatron distributed checkpoint holds.

    Reads the checkpoint's ``metadata.json`` and, for the ``torch_dist`` backend (megatron's
    default), torch's ``.metadata`` file, taking each tensor's global shape from its
    ``TensorStorageMetadata.size``; no tensor is built and no collective runs. (Megatron's
    ``load_tensors_metadata`` builds ``torch.empty(size, **properties)``, which torch 2.15's
    ``TensorProperties`` with their ``strides`` field break.) Other backends go through
    ``load_tensors_metadata``.
    """
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointingException(f"Checkpoint directory {checkpoint_dir} does not exist")
    config = maybe_load_config(checkpoint_dir)
    if config is None:
        raise CheckpointingException(f"{checkpoint_dir} is not a distributed checkpoint")
    if config.sharded_backend != "torch_dist":
        return {k: tuple(sh.global_shape)
                for k, sh in dist_checkpointing.load_tensors_metadata(checkpoint_dir).items()}
    entries = FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
    return {k: tuple(md.size) for k, md in entries.items() if isinstance(md, TensorStorageMetadata)}


def _saved_layout(saved: dict, mlp_prefix: str, ffn: int) -> tuple:
    """``(p, k)`` a phantom MLP was saved with, from fc2's global shapes (``None`` where unknown)."""
    local = saved.get(mlp_prefix + "linear_fc2.local_weight")
    if local is None or not local[-1] or ffn % local[-1]:
        return None, None
    p = ffn // local[-1]                                             # local_weight [.., h, ffn/p]
    comp = saved.get(mlp_prefix + "linear_fc2.compressor")          # compressor   [.., p*k, ffn/p]
    return p, (comp[-2] // p if comp is not None else None)


def save_checkpoint(model, checkpoint_dir: str, *, metadata: Optional[dict] = None, **save_kwargs) -> None:
    """``dist_checkpointing.save`` of ``model``'s sharded state dict into ``checkpoint_dir`` (created; collective)."""
    model = _single(model, "save_checkpoint")
    os.makedirs(checkpoint_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(metadata=metadata), checkpoint_dir, **save_kwargs)


def load_checkpoint(model, checkpoint_dir: str, *, metadata: Optional[dict] = None, strict: bool = True) -> None:
    """:func:`check_checkpoint`, then ``dist_checkpointing.load`` and ``load_state_dict`` (collective)."""
    model = _single(model, "load_checkpoint")
    check_checkpoint(model, checkpoint_dir, metadata=metadata)
    state = dist_checkpointing.load(model.sharded_state_dict(metadata=metadata), checkpoint_dir)
    model.load_state_dict(state, strict=strict)
