"""The tensor-parallel baseline: an FFN built from megatron-core's own parallel linear layers.

``ColumnParallelLinear`` (``gather_output=False``) then ``RowParallelLinear``
(``input_is_parallel=True``), activation between layers, one all-reduce per pair forward and
one (the column layer's input grad) backward. An odd last layer is a column layer whose output
is all-gathered with :func:`phantom_plugin.ops.gather_from_group` (megatron's own
``gather_output=True`` allocates on CUDA). Weights come from :func:`phantom_plugin.init.dense_master` with the same
seed per layer as ``PhantomFFN`` (``init.derive_seed(seed, l)``), so the TP model's diagonal
blocks are the phantom model's local blocks. Needs megatron-core (the ``megatron`` extra).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .. import init
from .. import ops
from ..layers import _ACT
from ..shapes import divisibility_error

__all__ = ["MegatronTPFFN", "megatron_config"]


def megatron_config(p: int, dtype: torch.dtype):
    """A CPU-safe ``ModelParallelConfig`` for ``p`` TP ranks (no fusions, CPU initialisation)."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    return ModelParallelConfig(tensor_model_parallel_size=p, use_cpu_initialization=True,
                               perform_initialization=True, params_dtype=dtype,
                               gradient_accumulation_fusion=False, sequence_parallel=False)


class MegatronTPFFN(nn.Module):
    """``depth`` megatron TP layers of width ``width`` on ``group``: ``[*, width]`` replicated in and out."""

    def __init__(self, width: int, depth: int, *, group: Optional[dist.ProcessGroup],
                 activation: Union[str, Callable] = "gelu", bias: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        p = dist.get_world_size(group) if dist.is_initialized() else 1
        error = divisibility_error("width", width, p)
        if error:
            raise ValueError(f"MegatronTPFFN: {error}")
        cfg = megatron_config(p, dtype)
        self.act = _ACT[activation] if isinstance(activation, str) else activation
        self.depth, self.group = depth, group
        layers = []
        for l in range(depth):
            master = init.dense_master(init.derive_seed(seed, l), width, width)

            def init_method(w, _m=master):
                with torch.no_grad():
                    w.copy_(_m.to(w.dtype))
            if l % 2 == 0:
                layers.append(ColumnParallelLinear(width, width, config=cfg, init_method=init_method,
                                                   bias=bias, gather_output=False,
                                                   skip_bias_add=False, tp_group=group))
            else:
                layers.append(RowParallelLinear(width, width, config=cfg, init_method=init_method,
                                                bias=bias, input_is_parallel=True,
                                                skip_bias_add=False, tp_group=group))
        self.layers = nn.ModuleList(layers)
        if bias:
            self._init_bias(seed, width, p, dist.get_rank(group) if p > 1 else 0)

    @torch.no_grad()
    def _init_bias(self, seed: int, width: int, p: int, rank: int) -> None:
        for l, layer in enumerate(self.layers):
            full = init.dense_bias(init.derive_seed(seed, l), width, width)
            part = full if l % 2 else full[rank * width // p:(rank + 1) * width // p]
            layer.bias.copy_(part.to(layer.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for l, layer in enumerate(self.layers):
            h, _ = layer(h)            # column: [*, w/p] (or [*, w] gathered), row: [*, w]
            if l < self.depth - 1:
                h = self.act(h)
        return ops.gather_from_group(h, self.group) if self.depth % 2 else h

    @torch.no_grad()
    def to_dense(self) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Each layer's full ``(weight, bias)`` gathered from the shards (collective)."""
        from .. import comm
        group = self.group
        out = []
        for l, layer in enumerate(self.layers):
            w = comm.all_gather(layer.weight.detach(), group, tag="to_dense")   # [p, ...]
            b = layer.bias
            if l % 2 == 0:
                weight = w.reshape(-1, w.shape[-1])
                b = None if b is None else comm.all_gather(b.detach(), group, tag="to_dense").reshape(-1)
            else:
                weight = torch.cat(w.unbind(0), dim=1)
                b = None if b is None else b.detach().clone()
            out.append((weight, b))
        return out
