"""``PhantomEdgeLinear``: a converted dense layer, its input check and its way back to dense.

A :class:`PhantomEdgeLinear` replaces one dense layer of a converted module (see
:mod:`phantom_plugin.convert`). Besides the phantom layer and the region ops of the block edge it
sits on, it keeps what is needed to undo the conversion exactly:

* ``template``: the original layer with its parameters on the ``meta`` device (no memory), so
  :meth:`PhantomEdgeLinear.to_dense` rebuilds a layer of the original type (``nn.Linear``
  or a subclass, Hugging Face's ``Conv1D`` with its ``[in, out]`` weight, ...);
* ``transposed``: the original stores its weight ``[in, out]`` (``Conv1D``);
* ``fused_chunks``: the original's output is ``chunks`` layers side by side that the module's
  forward splits with ``chunk(c, dim=-1)`` (Phi-3's ``gate_up_proj``). The phantom layer holds
  the rows permuted so that rank ``r``'s output shard is ``[chunk_0 rows of r, chunk_1 rows of
  r, ...]``: the module's own ``chunk`` then splits each shard into matching pieces.

Input check: the first forward of a layer that takes the replicated input checks, with one
all-gather of a 4-number checksum per layer, that the input is the same on every rank of the
phantom group; ranks fed different batches would otherwise be mixed silently.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import blocks, comm, ops
from .layers import PhantomLinear

__all__ = ["PhantomEdgeLinear", "dense_parts", "fused_row_order", "meta_template"]

_INPUT_RTOL = 1e-5
_FIX = ("feed the ranks of one phantom group the same batch: shard data by data-parallel rank, not "
        "by global rank (DistributedSampler(num_replicas=<data-parallel size>, rank=<data-parallel "
        "rank>), e.g. from engine.mpu / phantom_plugin.deepspeed's mpu; DeepSpeed's training_data=; "
        "Hugging Face Trainer/Accelerate shard correctly once the plugin is installed or "
        "phantom_plugin.integrations.deepspeed_autoload.register() was called), and seed every rank the same")


def dense_parts(module: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], bool]]:
    """``(weight [out, in] view, bias, transposed)`` of a linear-like layer, or ``None``.

    Linear-like: ``nn.Linear`` (and subclasses) or a ``Conv1D`` (``weight [in, out]``, ``nf``
    output features: GPT-2's), recognised by duck typing so that the core needs no transformers.
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, False
    w = getattr(module, "weight", None)
    if (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1]):
        return w.t(), getattr(module, "bias", None), True
    return None


def meta_template(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the ``meta`` device (no data copied)."""
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def fused_row_order(n_out: int, chunks: int, p: int) -> torch.Tensor:
    """Dense row index of each phantom row: rank by rank, chunk by chunk (``n_out/(chunks p)`` each)."""
    per = n_out // (chunks * p)
    return torch.cat([torch.arange(j * n_out // chunks + r * per, j * n_out // chunks + (r + 1) * per)
                      for r in range(p) for j in range(chunks)])


def _gather_exact(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``t`` as float64 bit patterns (int64), so no wire dtype can round it: ``[p, ...]``."""
    x = t.detach().to(torch.float64).contiguous()
    return comm.all_gather(x.view(torch.int64), group, tag="export").view(torch.float64)


class PhantomEdgeLinear(nn.Module):
    """A :class:`PhantomLinear` with the region ops of the block edge it sits on.

    ``scatter_input``: input ``[*, n_in]`` replicated -> own slice (backward: all-gather of the
    grad). ``gather_output``: output shard ``[*, n_out/p]`` -> ``[*, n_out]`` all-gathered
    (backward: own slice). Without either, input ``[*, n_in/p]`` and output ``[*, n_out/p]``.
    See the module docstring for ``template``, ``transposed``, ``fused_chunks`` and the input
    check (``check_input``).
    """

    def __init__(self, phantom: PhantomLinear, *, scatter_input: bool, gather_output: bool,
                 template: Optional[nn.Module] = None, transposed: bool = False,
                 fused_chunks: int = 1, name: str = ""):
        super().__init__()
        self.phantom, self.scatter_input, self.gather_output = phantom, scatter_input, gather_output
        self.in_features, self.out_features = phantom.in_features, phantom.out_features
        self._template = [template]          # a list: not a registered submodule, not in state_dict
        self.transposed, self.fused_chunks, self.name = transposed, fused_chunks, name
        self.check_input = scatter_input
        self._input_checked = False

    @property
    def template(self) -> Optional[nn.Module]:
        return self._template[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.phantom.group
        if self.check_input and not self._input_checked:
            self._check_replicated(x)
        if self.scatter_input:
            x = ops.scatter_to_group(x, group)                            # [*, n_in/p]
        y = self.phantom(x)                                               # [*, n_out/p]
        return ops.gather_from_group(y, group) if self.gather_output else y

    @torch.compiler.disable(reason=(
        "phantom_plugin: a converted layer checks on its first forward that every rank got the "
        "same input (an eager all-gather and a comparison on the host); run one eager forward "
        "before torch.compile(..., fullgraph=True), or compile without fullgraph (one graph "
        "break, on the first call only)"))
    def _check_replicated(self, x: torch.Tensor) -> None:
        """One all-gather of ``[numel, sum, |sum|, weighted sum]``; raises on every rank on a mismatch.

        Runs eagerly under ``torch.compile`` (host-side comparison), once per layer."""
        self._input_checked = True
        p = self.phantom.group_size
        if p == 1:
            return
        group = self.phantom.group
        with torch.no_grad():
            flat = x.detach().reshape(-1).to(torch.float64)
            idx = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64)
            mine = torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device),
                                flat.sum(), flat.abs().sum(), (flat * torch.cos(idx * 0.7548776662)).sum()])
            mine = mine.to(comm.collective_device(group))
            table = comm.all_gather(mine.view(torch.int64), group, tag="input_check").view(torch.float64).cpu()
        scale = table[:, 2].abs().max().item() + 1e-30
        bad = [r for r in range(p) if table[r, 0] != table[0, 0]
               or (table[r, 1:] - table[0, 1:]).abs().max().item() > _INPUT_RTOL * scale]
        if bad:
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(p))
            raise RuntimeError(
                f"phantom layer '{self.name}': its input differs across the ranks of the phantom "
                f"group {list(ranks)} (group ranks {bad} differ from group rank 0: per-rank "
                f"[numel, sum] = {[[int(r[0]), round(float(r[1]), 6)] for r in table]}), so they "
                f"were fed different batches and the phantom layer would mix them silently; {_FIX}")

    def extra_repr(self) -> str:
        extra = (", transposed=True" if self.transposed else "") + (
            f", fused_chunks={self.fused_chunks}" if self.fused_chunks > 1 else "")
        return f"scatter_input={self.scatter_input}, gather_output={self.gather_output}{extra}"

    # --- the way back ---------------------------------------------------------------------------

    @torch.no_grad()
    def dense_weight(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The exact dense ``(weight [out, in], bias)`` in float64, in the original row order, on every rank.

        ``W[i,i] = L_i``, ``W[i,j] = D_ij C_j`` computed in float64 from the gathered blocks.
        Collective over the phantom group (call on all its ranks).
        """
        ph = self.phantom
        if ph.group_size == 1:
            w = ph.local_weight.detach().to(torch.float64)
            b = None if ph.bias is None else ph.bias.detach().to(torch.float64)
        else:
            g = ph.group
            local = _gather_exact(ph.local_weight, g).unbind(0)
            comp = _gather_exact(ph.compressor, g).unbind(0)
            decomp = _gather_exact(ph.decompressor, g).unbind(0)
            w = blocks.dense_from_blocks(local, comp, decomp)
            b = None if ph.bias is None else _gather_exact(ph.bias, g).reshape(-1)
        if self.fused_chunks > 1:
            order = fused_row_order(self.out_features, self.fused_chunks, ph.group_size).to(w.device)
            w = torch.empty_like(w).index_copy_(0, order, w)
            b = None if b is None else torch.empty_like(b).index_copy_(0, order, b)
        return w, b

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """A layer of the original type holding :meth:`dense_weight`, in the phantom layer's dtype and device."""
        w, b = self.dense_weight()
        ref = self.phantom.local_weight
        if self.template is not None:
            dense = copy.deepcopy(self.template).to_empty(device=ref.device)
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=b is not None, device=ref.device)
        dense = dense.to(dtype=ref.dtype)
        weight, bias, _ = dense_parts(dense)          # weight: an [out, in] view either way
        weight.copy_(w.to(ref.dtype))
        if (bias is None) != (b is None):
            raise ValueError(f"phantom layer '{self.name}': bias presence differs from its template")
        if bias is not None:
            bias.copy_(b.to(ref.dtype))
        for prm in dense.parameters():
            prm.requires_grad_(ref.requires_grad)
        return dense
