"""Converting trained models: TP MLPs -> phantom MLPs (truncated SVD) and phantom -> dense TP MLPs.

:func:`convert_to_phantom` replaces, in place, the dense ``MLP`` of every ``TransformerLayer``
of a built (and possibly checkpoint-loaded) megatron model with a :class:`PhantomMLP` initialised
from the exact dense weights by truncated SVD (``PhantomLinear.from_dense``, Eckart-Young), and
reports the relative approximation error of fc1 and fc2 per layer. Use it to compress a trained
model for cheaper fine-tuning and inference; rebuild the optimizer afterwards.

:func:`to_dense` is the inverse and exact: each :class:`PhantomMLP` becomes a stock
megatron ``MLP`` (column-parallel fc1, row-parallel fc2) at the same TP size holding the
dense-equivalent weights ``W[i,j] = D_ij C_j``. Its checkpoint is a stock one, which megatron
reshards to any TP size; that is the path between phantom checkpoints of different TP sizes.

Both are collective over each layer's TP group (they all-gather weights): call them on every rank.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from .. import comm
from .mlp import PhantomMLP

__all__ = ["MLPConversion", "convert_to_phantom", "to_dense", "dense_mlp_weights"]


@dataclasses.dataclass(frozen=True)
class MLPConversion:
    """One converted layer: relative Frobenius errors ``||W - W_phantom|| / ||W||`` and group-wide parameters."""
    name: str
    layer_number: int
    fc1_error: float
    fc2_error: float
    dense_params: int
    phantom_params: int

    def __str__(self) -> str:
        return (f"{self.name} (layer {self.layer_number}): fc1 error {self.fc1_error:.3e}, fc2 error "
                f"{self.fc2_error:.3e}, params {self.dense_params:,} -> {self.phantom_params:,}")


def _layers(model) -> Iterable[tuple[str, TransformerLayer]]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for c, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            if isinstance(module, TransformerLayer):
                yield (f"{c}:{name}" if len(chunks) > 1 else name), module


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def dense_mlp_weights(mlp: MLP):
    """``(W1 [fc1_out, h], b1, W2 [h, ffn], b2)`` of a megatron TP ``MLP``, full, on every rank.

    Gated fc1 rows come out in megatron's global order ``[gate; up]``. Collective over ``mlp.tp_group``.
    """
    g = mlp.tp_group
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    gated = mlp.config.gated_linear_unit

    def rows(t):                                                   # [fc1_out/p, ...] per rank
        chunks = comm.all_gather(t.detach(), g, tag="convert").unbind(0)
        if not gated:
            return torch.cat(chunks, 0)
        halves = [c.chunk(2, dim=0) for c in chunks]                # ([gate_r], [up_r])
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)

    w1 = rows(fc1.weight)
    b1 = rows(fc1.bias) if getattr(fc1, "bias", None) is not None else None
    w2 = torch.cat(comm.all_gather(fc2.weight.detach(), g, tag="convert").unbind(0), dim=1)
    b2 = fc2.bias.detach().clone() if getattr(fc2, "bias", None) is not None else None
    return w1, b1, w2, b2


def convert_to_phantom(model, *, ghost_dim: int, seed: int = 0) -> list[MLPConversion]:
    """Replace every dense TP ``MLP`` of ``model`` (a module or a list of model chunks) in place.

    Returns one :class:`MLPConversion` per layer. MoE layers and layers already phantom are
    skipped. Layers whose fc1 carries a fused norm (Transformer Engine's
    ``TELayerNormColumnParallelLinear``) are refused: build the model from the local spec (the
    checkpoint keys are the same) and convert that.
    """
    report = []
    for name, layer in _layers(model):
        mlp = layer.mlp
        if type(mlp) is not MLP:
            continue
        if hasattr(mlp.linear_fc1, "layer_norm_weight"):
            raise NotImplementedError(
                f"convert_to_phantom: {name}.mlp.linear_fc1 has a fused norm (Transformer Engine "
                "spec); build the model with get_gpt_layer_local_spec() (same checkpoint keys), load "
                "the checkpoint and convert that")
        w1, b1, w2, b2 = dense_mlp_weights(mlp)
        ref = mlp.linear_fc1.weight
        new = PhantomMLP(mlp.config, ghost_dim=ghost_dim, ffn_hidden_size=w2.shape[1],
                         tp_group=mlp.tp_group, seed=seed)
        new.layer_number = layer.layer_number
        new = new.to(device=ref.device, dtype=ref.dtype)
        e1, e2 = new.load_dense(w1, b1, w2, b2)
        p = comm.group_size(mlp.tp_group)
        dense = w1.numel() + w2.numel() + sum(b.numel() for b in (b1, b2) if b is not None)
        report.append(MLPConversion(f"{name}.mlp", layer.layer_number, e1, e2, dense, _numel(new) * p))
        layer.mlp = new
    return report


def to_dense(model) -> int:
    """Replace every :class:`PhantomMLP` of ``model`` with an exactly equivalent megatron ``MLP``.

    The new MLP is TP-sharded over the same group (``config.use_cpu_initialization`` decides the
    device it is built on, then it moves to the phantom weights' device). Returns the count.
    """
    count = 0
    for name, layer in _layers(model):
        mlp = layer.mlp
        if not isinstance(mlp, PhantomMLP):
            continue
        w1, b1, w2, b2 = mlp.to_dense()
        g, p, r = mlp.tp_group, mlp.group_size, comm.group_rank(mlp.tp_group)
        ffn, ref = mlp.ffn_hidden_size, mlp.linear_fc1.local_weight
        dense = MLP(mlp.config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                    ffn_hidden_size=ffn, tp_group=g).to(device=ref.device, dtype=ref.dtype)
        m = ffn // p
        if mlp.gated:
            own = torch.cat([torch.arange(r * m, (r + 1) * m), ffn + torch.arange(r * m, (r + 1) * m)])
        else:
            own = torch.arange(r * m, (r + 1) * m)
        with torch.no_grad():
            dense.linear_fc1.weight.copy_(w1[own])
            dense.linear_fc2.weight.copy_(w2[:, r * m:(r + 1) * m])
            for target, src in ((dense.linear_fc1.bias, None if b1 is None else b1[own]),
                                (dense.linear_fc2.bias, b2)):
                if (target is None) != (src is None):
                    raise ValueError(f"to_dense: {name}: bias presence differs between the "
                                     "phantom MLP and config.add_bias_linear")
                if target is not None:
                    target.copy_(src)
        if hasattr(dense, "set_layer_number"):
            dense.set_layer_number(layer.layer_number)
        layer.mlp = dense
        count += 1
    return count

