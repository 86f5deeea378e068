"""Helpers for the megatron tests: parallel state, small CPU GPT models, stdlib byte data.

Test-only: :func:`redirect_cuda_for_checkpointing` redirects the ``torch.cuda`` calls that
megatron's checkpoint saver hard-codes (``synchronize``, ``current_device``) to CPU inside the
spawned test ranks. The plugin itself never does this.
"""
from __future__ import annotations


import torch

from phantom_plugin.megatron.data import stdlib_bytes


def init_megatron(tp: int, pp: int = 1, seed: int = 1234) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)


def make_config(tp: int, pp: int = 1, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig
    kw = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
              use_cpu_initialization=True, bias_dropout_fusion=False, bias_activation_fusion=False,
              masked_softmax_fusion=False, gradient_accumulation_fusion=False,
              hidden_dropout=0.0, attention_dropout=0.0,
              tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
              pipeline_dtype=torch.float32)
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt(config, spec, *, vocab: int = 256, seq: int = 16, pre_process: bool = True,
              post_process: bool = True):
    from megatron.core.models.gpt import GPTModel
    from phantom_plugin.megatron.cpu import cpu_attention_spec
    return GPTModel(config, transformer_layer_spec=cpu_attention_spec(spec), vocab_size=vocab,
                    max_sequence_length=seq, position_embedding_type="learned_absolute",
                    share_embeddings_and_output_weights=False,
                    pre_process=pre_process, post_process=post_process)


def batches(n_steps: int, batch: int, seq: int):
    """``[(tokens [b, s], labels [b, s], position_ids [b, s])]`` from stdlib bytes."""
    data = stdlib_bytes(n_steps * batch * (seq + 1)).view(n_steps, batch, seq + 1)
    pos = torch.arange(seq).expand(batch, seq)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous(), pos) for d in data]


def gpt_loss(model, tokens, labels, pos):
    losses = model(tokens, pos, None, labels=labels)                 # [b, s]
    return losses.float().mean()


def redirect_cuda_for_checkpointing() -> None:
    """Test-only, inside spawned CPU ranks: megatron's dist_checkpointing saver calls
    ``torch.cuda.synchronize()`` and puts its failure flag on ``torch.cuda.current_device()``."""
    assert not torch.cuda.is_available(), "only for CPU-only test ranks"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"


def set_params_by_name(model, tp_rank: int, layer_offset: int = 0, scale: float = 0.05) -> None:
    """Overwrite every parameter from a generator keyed by its global name and, for TP-sharded
    parameters, the TP rank (replicated ones get the same values on every rank).

    ``layer_offset`` maps this pipeline stage's local ``decoder.layers.i`` to global ``i + offset``,
    so the same global model comes out whatever the pipeline split.
    """
    import zlib
    for name, p in model.named_parameters():
        name = global_name(name, layer_offset)
        if "norm" in name and name.endswith("weight"):
            with torch.no_grad():
                p.fill_(1.0)
            continue
        shard = tp_rank if getattr(p, "tensor_model_parallel", False) else 0   # replicated: same everywhere
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{shard}".encode()))
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def global_name(name: str, layer_offset: int) -> str:
    """``decoder.layers.i.<rest>`` of a pipeline stage -> ``decoder.layers.{i + offset}.<rest>``."""
    import re
    m = re.match(r"(.*decoder\.layers\.)(\d+)(\..*)", name)
    return f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}" if m else name
