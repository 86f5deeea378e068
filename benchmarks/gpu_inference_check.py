"""Megatron-core's own inference engine driving a phantom GPT (CUDA only; 1 or 2 GPUs).

Not run in CI (it needs CUDA): ``benchmarks/gpu_check.sh`` calls it through torchrun. A small
random GPT (local spec, RoPE, fp32) is built from ``with_phantom_mlp(get_gpt_layer_local_spec())``;
megatron's ``StaticInferenceEngine`` (legacy: static KV cache; default: the dynamic engine under
the hood) generates greedily (``top_k=1``) and its tokens are compared with
``phantom_plugin.megatron.greedy_generate`` (full recompute, no KV cache). Kernels differ between
the two paths, so near-ties may flip late tokens: the script prints the matching prefix and fails
only when an engine raises, returns no tokens, or disagrees on the first generated token.

    torchrun --nproc_per_node 1 benchmarks/gpu_inference_check.py [--tokens 32]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.distributed as dist

PROMPT = "def phantom_parallel(hidden, ghost_dim):\n    "


class ByteTokenizer:
    """Bytes 0..255, then ``bos = 256`` and ``eod = 257`` (what megatron's controller reads)."""
    bos, eod, vocab_size = 256, 257, 258

    def tokenize(self, text):
        return list(text.encode("utf-8"))

    def detokenize(self, ids, **_):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def offsets(self, ids, text):
        return list(range(len(text)))


def build_model(tp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from phantom_plugin.megatron import count_phantom_mlps, with_phantom_mlp
    config = TransformerConfig(num_layers=2, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4,
                               tensor_model_parallel_size=tp, hidden_dropout=0.0, attention_dropout=0.0,
                               params_dtype=torch.float32)
    spec = with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=16)
    model = GPTModel(config, transformer_layer_spec=spec, vocab_size=ByteTokenizer.vocab_size,
                     max_sequence_length=256, position_embedding_type="rope").cuda().eval()
    if count_phantom_mlps(model) != config.num_layers:
        raise SystemExit(f"expected {config.num_layers} phantom MLPs, found {count_phantom_mlps(model)}")
    return model


def engine_tokens(model, legacy: bool, n: int) -> list:
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController)
    wrapper = GPTInferenceWrapper(model, StaticInferenceContext(max_batch_size=1, max_sequence_length=256))
    controller = TextGenerationController(inference_wrapped_model=wrapper, tokenizer=ByteTokenizer())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = StaticInferenceEngine(controller, max_batch_size=1, legacy=legacy)
    for w in caught:
        if "legacy static engine" in str(w.message):
            print(f"  note: {w.message}")
    [result] = engine.generate(prompts=[PROMPT], sampling_params=SamplingParams(
        top_k=1, num_tokens_to_generate=n, termination_id=-1))
    return [int(t) for t in result.generated_tokens]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_inference_check: needs CUDA (megatron's inference engines allocate on the GPU)")
        return 2
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from phantom_plugin.megatron import greedy_generate
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    model = build_model(tp)
    prompt = torch.tensor([ByteTokenizer().tokenize(PROMPT)], device="cuda")
    reference = greedy_generate(model, prompt, args.tokens)[0, prompt.shape[1]:].tolist()
    failed = False
    for legacy in (True, False):
        name = "StaticInferenceEngine(legacy=True, static KV cache)" if legacy else \
            "StaticInferenceEngine (dynamic engine under the hood)"
        try:
            got = engine_tokens(model, legacy, args.tokens)
        except ModuleNotFoundError as e:  # an optional kernel package the engine needs (flash_attn)
            print(f"{name}: SKIPPED: {e} (megatron's engine needs it; not a phantom failure)")
            continue
        except Exception as e:  # report and go on to the other engine; the exit code says it failed
            print(f"{name}: FAILED: {type(e).__name__}: {e}")
            failed = True
            continue
        prefix = next((i for i, (a, b) in enumerate(zip(got, reference)) if a != b), min(len(got), len(reference)))
        ok = len(got) > 0 and got[0] == reference[0]
        failed |= not ok
        if dist.get_rank() == 0:
            print(f"{name}: TP={tp}, {len(got)} tokens, {prefix} match greedy_generate "
                  f"({'ok' if ok else 'FIRST TOKEN DIFFERS'})")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
