"""Greedy generation for a megatron-core ``GPTModel`` on any device, CPU included.

Megatron-core's inference engines (``StaticInferenceEngine``, ``DynamicInferenceEngine``,
``TextGenerationController``) allocate their KV cache and sampling state with ``torch.cuda``, so
they do not run on CPU. :func:`greedy_generate` is the plain loop they shortcut: rerun the whole
sequence (no KV cache), take the argmax of the last position's logits, append, repeat. It works
for phantom and stock models alike, so a phantom model's tokens can be compared with those of the
same model after :func:`~phantom_plugin.megatron.to_dense` (an exact conversion: the
greedy tokens must match).

The logits of a tensor-parallel ``GPTModel`` are vocab-sharded (``parallel_output=True``); the
last position's shards are all-gathered over the TP group, so every rank picks the same token.
An explicit causal mask is passed (``True`` = masked out, megatron's convention).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, comm
from .mlp import resolve_tp_group

__all__ = ["greedy_generate"]

WHO = "greedy_generate"


def _unwrap(model):
    """The ``GPTModel`` inside DDP / Float16Module wrappers (they keep it as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _local_error(gpt, prompt: torch.Tensor, n: int) -> Optional[str]:
    if prompt.dim() != 2 or prompt.dtype not in (torch.int64, torch.int32) or prompt.shape[1] < 1:
        return (f"prompt must be an integer tensor [batch, seq] with seq >= 1, got "
                f"{tuple(prompt.shape)} {prompt.dtype}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"max_new_tokens must be an integer >= 1, got {n!r}"
    if not (getattr(gpt, "pre_process", True) and getattr(gpt, "post_process", True)):
        return ("the model is one pipeline stage (pre_process/post_process False); greedy_generate "
                "runs a whole model: build it with pipeline_model_parallel_size=1")
    limit = getattr(gpt, "max_sequence_length", None)
    total = prompt.shape[1] + n
    if limit is not None and getattr(gpt, "position_embedding_type", "") == "learned_absolute" \
            and total > limit:
        return (f"prompt length {prompt.shape[1]} + max_new_tokens {n} = {total} exceeds the model's "
                f"max_sequence_length {limit} (learned absolute positions); shorten the prompt or "
                "generate fewer tokens")
    return None


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, max_new_tokens: int, *, tp_group=None,
                    vocab_size: Optional[int] = None) -> torch.Tensor:
    """The prompt followed by its next ``max_new_tokens`` greedy tokens.

    Args:
        model: a ``GPTModel`` (or a wrapper holding it as ``.module``), one pipeline stage holding
            all layers; put in eval mode for the call and restored afterwards.
        prompt: ``[batch, seq]`` token ids, the same on every TP rank (checked: one small
            all-gather; every rank raises if any rank's arguments differ or are invalid).
        max_new_tokens: ``N >= 1``.
        tp_group: the model's TP group (default: the model's ``pg_collection.tp``, else
            megatron's parallel state).
        vocab_size: ignore logits past this id (megatron pads the vocabulary to a multiple of
            the TP size; padded ids must never be picked). Default: all.
    Returns:
        ``[batch, seq + N]`` int64 on the prompt's device, identical on every TP rank.
    """
    gpt = _unwrap(model)
    group = resolve_tp_group(tp_group, getattr(gpt, "pg_collection", None), WHO)
    p = comm.group_size(group)
    error = _local_error(gpt, prompt, max_new_tokens)
    fields = {"batch": 0, "prompt_len": 0, "max_new_tokens": 0, "prompt_checksum": 0}
    if error is None:                     # a position-weighted sum: a changed or moved token shows
        weights = torch.arange(1, prompt.numel() + 1, device=prompt.device).view_as(prompt)
        fields = {"batch": prompt.shape[0], "prompt_len": prompt.shape[1],
                  "max_new_tokens": max_new_tokens,
                  "prompt_checksum": int((prompt.long() * weights).sum() % (1 << 61))}
    checks.agree_across_group(group, p, WHO, fields, error)     # before any forward or collective

    was_training = model.training
    model.eval()
    try:
        tokens = prompt.long()
        b = tokens.shape[0]
        full_vocab = getattr(gpt, "vocab_size", None)
        for _ in range(max_new_tokens):
            s = tokens.shape[1]
            positions = torch.arange(s, device=tokens.device).expand(b, s)
            mask = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1)[None, None]
            logits = model(tokens, positions, mask)                     # [b, s, V/p] or [b, s, V]
            last = logits[:, -1].float()                                 # [b, V/p]
            if p > 1 and last.shape[-1] != full_vocab:                  # vocab-parallel output
                shards = comm.all_gather(last.contiguous(), group, tag="generate_logits")  # [p, b, V/p]
                last = shards.permute(1, 0, 2).reshape(b, -1)           # [b, V], rank order
            if vocab_size is not None:
                last = last[:, :vocab_size]
            tokens = torch.cat([tokens, last.argmax(dim=-1, keepdim=True)], dim=1)
    finally:
        model.train(was_training)
    return tokens
