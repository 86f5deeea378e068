"""The model of ``phantom-bench --task lm`` (and ``examples/megatron_gpt_phantom.py``): a byte-level
megatron-core ``GPTModel`` with TP attention and either megatron's TP MLPs or phantom MLPs, put
in by the spec swap users run (:func:`phantom_plugin.megatron.with_phantom_mlp`).

On GPUs (NCCL, one per rank) the stock layer spec (Transformer Engine when installed) and RoPE;
on CPU megatron's local spec with a CPU-friendly ``core_attention``
(:func:`phantom_plugin.megatron.cpu.cpu_attention_spec`) and learned absolute positions. Both
models start from the same seed, and TP's MLPs get the phantom MLPs' initialisation convention
(:func:`same_mlp_init`), so at equal width they differ only in the off-diagonal blocks.

Needs megatron-core and megatron's parallel state initialised for the TP group
(``initialize_model_parallel``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..modeling import counts

__all__ = ["VOCAB", "build_gpt", "same_mlp_init", "unique_params", "gpt_step_macs"]

VOCAB = 256   # byte-level tokens


def build_gpt(*, hidden: int, ffn_hidden: int, layers: int, heads: int, seq: int, tp: int, seed: int,
              device: torch.device, ghost_dim: Optional[int] = None, init: str = "spectral") -> torch.nn.Module:
    """A ``GPTModel`` on ``device``: TP MLPs when ``ghost_dim`` is ``None``, else phantom MLPs with
    ``k = ghost_dim`` built with the phantom initialisation ``init`` (``phantom_plugin.init.INIT_SCHEMES``;
    ``"spectral"``, the default, won the parametrisation study in ``docs/choosing-k.md``).
    ``ffn_hidden`` is the MLP's inner width (each model may get its own)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ..megatron import with_phantom_mlp
    from ..megatron.cpu import cpu_attention_spec
    gpu = device.type == "cuda"
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not gpu, force_reset_rng=True)
    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn_hidden,
        num_attention_heads=heads, tensor_model_parallel_size=tp,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not gpu,
        bias_dropout_fusion=gpu, bias_activation_fusion=False, masked_softmax_fusion=gpu,
        gradient_accumulation_fusion=False)
    if gpu:
        spec = specs.get_gpt_layer_with_transformer_engine_spec() if specs.HAVE_TE else specs.get_gpt_layer_local_spec()
        positions = "rope"
    else:
        spec, positions = cpu_attention_spec(specs.get_gpt_layer_local_spec()), "learned_absolute"
    if ghost_dim is not None:
        spec = with_phantom_mlp(spec, ghost_dim=ghost_dim, seed=seed, init=init)
    model = GPTModel(config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=seq,
                     position_embedding_type=positions, share_embeddings_and_output_weights=False)
    if ghost_dim is None:
        same_mlp_init(model, seed)
    return model.to(device)


@torch.no_grad()
def same_mlp_init(model: torch.nn.Module, seed: int) -> None:
    """Give TP's MLPs the phantom MLPs' initialisation convention (fan-in uniform masters of
    :mod:`phantom_plugin.init`, seeded per layer as ``PhantomMLP``), so the comparison differs only
    in the off-diagonal blocks: TP's diagonal blocks then equal phantom's ``L_i``."""
    from megatron.core import parallel_state

    from .. import init
    p = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    for layer in model.decoder.layers:
        fc1, fc2 = layer.mlp.linear_fc1, layer.mlp.linear_fc2
        s1 = init.derive_seed(seed, layer.layer_number, "linear_fc1")               # as PhantomMLP's
        s2 = init.derive_seed(seed, layer.layer_number, "linear_fc2")
        hidden, ffn = fc1.weight.shape[1], fc1.weight.shape[0] * p
        w1, w2 = init.dense_master(s1, hidden, ffn), init.dense_master(s2, ffn, hidden)  # [ffn, h], [h, ffn]
        fc1.weight.copy_(w1[r * ffn // p:(r + 1) * ffn // p])                     # column parallel: rows
        fc2.weight.copy_(w2[:, r * ffn // p:(r + 1) * ffn // p])                  # row parallel: columns
        if fc1.bias is not None:
            fc1.bias.copy_(init.dense_bias(s1, hidden, ffn)[r * ffn // p:(r + 1) * ffn // p])
        if fc2.bias is not None:
            fc2.bias.copy_(init.dense_bias(s2, ffn, hidden))


def unique_params(model: torch.nn.Module, only: str = "") -> int:
    """Parameters of the whole TP group (names containing ``only``): sharded ones times the TP
    size, replicated ones once."""
    from megatron.core import parallel_state
    p = parallel_state.get_tensor_model_parallel_world_size()
    return sum(t.numel() * (p if getattr(t, "tensor_model_parallel", False) else 1)
               for n, t in model.named_parameters() if only in n)


def gpt_step_macs(*, hidden: int, ffn_hidden: int, layers: int, seq: int, batch: int, tp: int,
                  ghost_dim: Optional[int] = None, vocab: int = VOCAB) -> dict:
    """Modeled MACs of one training step (forward + backward = 3x forward) on one rank, by part.

    ``{"mlp", "attention", "output", "total"}``. MLPs: :func:`counts.tp_mlp_cost` or
    :func:`counts.phantom_mlp_cost`. Attention per layer, tokens ``T = batch*seq``: QKV ``3h^2 T/p``,
    scores and context ``2 T seq h/p`` (dense, the causal half is not skipped), projection
    ``h^2 T/p``. Output layer (vocab-parallel): ``T h V/p``. Embeddings, norms, softmax and the
    optimizer are not counted.
    """
    tokens, p = batch * seq, tp
    if ghost_dim is None:
        mlp = counts.tp_mlp_cost(hidden, ffn_hidden, p=p, tokens=tokens).macs * layers
    else:
        mlp = counts.phantom_mlp_cost(hidden, ffn_hidden, p=p, k=ghost_dim, tokens=tokens).macs * layers
    attention = 3 * layers * tokens * (4 * hidden * hidden + 2 * seq * hidden) // p
    output = 3 * tokens * hidden * vocab // p
    return {"mlp": mlp, "attention": attention, "output": output, "total": mlp + attention + output}
