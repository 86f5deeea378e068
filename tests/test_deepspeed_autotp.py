"""AutoTP attention + phantom MLPs in one DeepSpeed config, on a tiny Llama, under the real launcher.

2 CPU ranks, ZeRO-1: ``tensor_parallel.autotp_size = phantom_parallel.size = 2`` with a
``partition_config`` naming attention only (q/k/v column, o row), the MLPs phantom at
``ghost_neurons = width/size`` (exact). Checks: attention is AutoTP-sharded and the MLPs phantom;
the step-0 loss equals the dense model's; the losses and global grad norms (clipping active) of
5 steps equal those of the same phantom run with replicated attention (the same
parametrization); and the bad inputs of the issue (another AutoTP size, no attention-only
``partition_config``, a pattern that would shard a phantom MLP) fail before any process group.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

pytest.importorskip("transformers")

V, S, B, WIDTH, CLIP = 64, 16, 4, 64, 0.5


def _close(a, b, rtol):
    import numpy as np
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=1e-7)


@pytest.fixture(scope="module")
def autotp(tmp_path_factory) -> list[dict]:
    """One launch of 2 ranks: AutoTP on attention, phantom MLPs; every rank's results."""
    from test_deepspeed_launcher import launch_results
    return launch_results(2, Path(__file__), tmp_path_factory.mktemp("autotp"), timeout=600)


@pytest.mark.slow
def test_autotp_shards_attention_and_leaves_the_mlps_to_phantom(autotp):
    for r in autotp:
        assert r["attn_types"] == ["LinearAllreduce", "LinearLayer"], r["attn_types"]
        assert r["mlp_types"] == ["PhantomEdgeLinear"], r["mlp_types"]
        assert r["q_rows"] == 32 // 2


@pytest.mark.slow
def test_autotp_first_loss_is_the_dense_one(autotp):
    for r in autotp:
        assert abs(r["tp_losses"][0] - r["dense_loss0"]) < 1e-5 * r["dense_loss0"], (r["tp_losses"][0],
                                                                                     r["dense_loss0"])


@pytest.mark.slow
def test_autotp_trains_like_the_float64_twin(autotp):
    """Losses and global grad norms (clipping active) of the twin, rtol 1e-4; the loss goes down."""
    for r in autotp:
        assert min(r["ref_norms"]) > CLIP, "clipping must be active for the grad-norm check"
        assert _close(r["tp_losses"], r["ref_losses"], 1e-4), (r["tp_losses"], r["ref_losses"])
        assert _close(r["tp_norms"], r["ref_norms"], 1e-4), (r["tp_norms"], r["ref_norms"])
        assert r["tp_losses"][-1] < r["tp_losses"][0], r["tp_losses"]


def _ds(**tp):
    from phantom_plugin.deepspeed.config import ATTENTION_ONLY
    cfg = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
           "gradient_clipping": CLIP, "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 6,
           "phantom_parallel": {"enabled": True, "size": 2, "ghost_neurons": WIDTH // 2,
                                "target_modules": [r"\.mlp$"], "lr_multipliers": False}}   # one lr, as the reference
    if tp is not None:
        cfg["tensor_parallel"] = {"autotp_size": 2, "partition_config": ATTENTION_ONLY, **tp}
    return cfg


def _llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    conf = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=WIDTH, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=S)
    torch.manual_seed(0)
    return LlamaForCausalLM(conf)


@pytest.mark.fast
@pytest.mark.parametrize("tp, text", [
    ({"autotp_size": 4}, "tensor_parallel.autotp_size: 4 differs from phantom_parallel.size=2"),
    ({"partition_config": None}, "tensor_parallel.partition_config: with phantom_parallel, AutoTP must"),
    ({"partition_config": {"use_default_specs": True, "layer_specs": []}}, "use_default_specs\": false"),
    ({"partition_config": {"use_default_specs": False, "layer_specs": [
        {"patterns": [r".*\.down_proj\.weight$"], "partition_type": "row"}]}},
     "pattern '.*\\\\.down_proj\\\\.weight$' matches 'model.layers.0.mlp.down_proj.weight'"),
])
def test_autotp_bad_input_fails_before_any_process_group(tp, text, monkeypatch):
    import re
    import torch.distributed as dist
    from phantom_plugin.deepspeed import PhantomConfigError, initialize
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(PhantomConfigError, match=re.escape(text)):
        initialize(model=_llama(), config=_ds(**tp))
    assert not dist.is_initialized()


# ============================== rank side (under the launcher) ==============================

def _run(cfg, steps):
    import torch
    import deepspeed
    model = _llama()
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    losses, norms = [], []
    for step in range(steps):
        ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(step))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        norms.append(float(engine.get_global_grad_norm()))
    return engine, losses, norms


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    out: dict = {}
    ref_cfg = _ds()
    del ref_cfg["tensor_parallel"]
    _, out["ref_losses"], out["ref_norms"] = _run(ref_cfg, 5)
    engine, out["tp_losses"], out["tp_norms"] = _run(_ds(), 5)
    attn = engine.module.model.layers[0].self_attn
    out["attn_types"] = sorted({type(m).__name__ for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)})
    out["q_rows"] = attn.q_proj.weight.shape[0]
    mlp = engine.module.model.layers[0].mlp
    out["mlp_types"] = sorted({type(m).__name__ for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)})
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out["dense_loss0"] = float(_llama()(input_ids=ids, labels=ids).loss)
    from dist_utils import finish_rank
    finish_rank(Path(args.out), out)


if __name__ == "__main__":
    _main()
