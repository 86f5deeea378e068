"""CPU-friendly pieces for running megatron-core GPT models without CUDA (examples, tests).

Megatron's ``DotProductAttention`` allocates from a CUDA global memory buffer and its default
causal mask is built on CUDA. :class:`CPUDotProductAttention` computes the same attention with
``torch.nn.functional.scaled_dot_product_attention`` on any device; :func:`cpu_attention_spec`
puts it into a layer or block spec (a copy). Nothing here patches megatron.
"""
from __future__ import annotations

import copy

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

__all__ = ["CPUDotProductAttention", "cpu_attention_spec"]


class CPUDotProductAttention(DotProductAttention):
    """``DotProductAttention`` via SDPA: ``q [sq, b, np, hn]``, ``k, v [sk, b, ng, hn]`` -> ``[sq, b, np*hn]``.

    ``attention_mask`` (megatron's convention: ``True`` = masked out) is used when given;
    ``None`` means causal for causal mask types. Dropout uses ``config.attention_dropout``.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("CPUDotProductAttention: packed sequences and attention_bias are not supported")
        rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if rep > 1:
            key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))    # [b, np, s, hn]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        mask = None if attention_mask is None else ~attention_mask
        drop = self.attention_dropout.p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal,
                                             scale=self.softmax_scale)       # [b, np, sq, hn]
        ctx = ctx.permute(2, 0, 1, 3).contiguous()                           # [sq, b, np, hn]
        return ctx.view(*ctx.shape[:2], self.hidden_size_per_partition)


def _swap_attention(spec) -> None:
    if isinstance(spec, TransformerBlockSubmodules):
        for s in spec.layer_specs or []:
            _swap_attention(s)
        return
    if not isinstance(spec, ModuleSpec):
        return
    sub = spec.submodules
    if isinstance(sub, TransformerBlockSubmodules):
        _swap_attention(sub)
        return
    attn = getattr(sub, "self_attention", None)
    if isinstance(attn, ModuleSpec) and hasattr(attn.submodules, "core_attention"):
        attn.submodules.core_attention = CPUDotProductAttention


def cpu_attention_spec(spec):
    """A copy of a layer/block spec whose ``core_attention`` is :class:`CPUDotProductAttention`."""
    out = copy.deepcopy(spec)
    _swap_attention(out)
    return out



