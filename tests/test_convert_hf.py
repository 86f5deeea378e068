"""Hugging Face MLP layouts: every family converts exactly and exports back to itself.

Tiny models built from each family's ``transformers`` config (no downloads), float64, on two gloo
ranks. With ``ghost_neurons = width/size`` (``width`` the MLP's widest input; narrower layers are
capped at their own ``in_features/size``) the converted model's logits equal the dense model's
to float64 rounding; :func:`to_dense` gives back layers of the original types (``Conv1D``
for GPT-2, ``FalconLinear`` for Falcon, Phi-3's fused ``gate_up_proj`` in its original row order)
with the dense weights, identical on both ranks, and ``save_pretrained`` / ``from_pretrained``
reload them with the same logits and the same config. Ranks fed different inputs raise on both.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from dist_utils import run_ranks  # noqa: E402

V, H, W = 64, 16, 32         # vocabulary, hidden size, MLP width
MLP = [r"\.mlp$"]


def _families():
    import transformers as tf
    small = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=32)
    return {
        "llama": (tf.LlamaConfig(**small, intermediate_size=W, num_key_value_heads=2), tf.LlamaForCausalLM, MLP),
        "mistral": (tf.MistralConfig(**small, intermediate_size=W, num_key_value_heads=1), tf.MistralForCausalLM, MLP),
        "qwen2": (tf.Qwen2Config(**small, intermediate_size=W, num_key_value_heads=2), tf.Qwen2ForCausalLM, MLP),
        "qwen3": (tf.Qwen3Config(**small, intermediate_size=W, num_key_value_heads=2, head_dim=8), tf.Qwen3ForCausalLM, MLP),
        "gemma": (tf.GemmaConfig(**small, intermediate_size=W, num_key_value_heads=1, head_dim=8), tf.GemmaForCausalLM, MLP),
        "gpt2": (tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=2, n_positions=32, n_inner=W,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), tf.GPT2LMHeadModel, MLP),
        "gpt_neox": (tf.GPTNeoXConfig(**small, intermediate_size=W), tf.GPTNeoXForCausalLM, MLP),
        "falcon": (tf.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                   ffn_hidden_size=W, bias=True), tf.FalconForCausalLM, MLP),
        "bloom": (tf.BloomConfig(vocab_size=V, hidden_size=H, n_layer=2, n_head=2), tf.BloomForCausalLM, MLP),
        "phi": (tf.PhiConfig(**small, intermediate_size=W), tf.PhiForCausalLM, MLP),
        "phi3": (tf.Phi3Config(**small, intermediate_size=W, num_key_value_heads=2, pad_token_id=0),
                 tf.Phi3ForCausalLM, MLP),
        "opt": (tf.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                             ffn_dim=W, word_embed_proj_dim=H, max_position_embeddings=32, dropout=0.0),
                tf.OPTForCausalLM, [r"decoder\.layers\.\d+$"]),
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _widest(model, names):
    """The widest input of the linear children of the matched modules."""
    from phantom_plugin.edge import dense_parts
    return max(dense_parts(c)[0].shape[1] for n in names for c in model.get_submodule(n).children()
               if dense_parts(c) is not None)


def _family_rank(rank, world, tmp):
    import torch.distributed as dist
    from phantom_plugin.convert import PhantomEdgeLinear, check_convertible, convert_modules, to_dense
    out = {}
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    for fam, (config, cls, targets) in _families().items():
        torch.manual_seed(0)
        dense = cls(config).double().eval()
        model = copy.deepcopy(dense)
        names = check_convertible(model, targets, size=world, ghost_dim=1)
        types = {n: type(m).__name__ for n, m in model.named_modules()}
        k = _widest(model, names) // world
        done = convert_modules(model, targets, ghost_dim=k, group=None)
        edges = [n for n, m in model.named_modules() if isinstance(m, PhantomEdgeLinear)]
        ref = _logits(dense, ids)
        err = float((_logits(model, ids) - ref).abs().max())
        restored = to_dense(model)
        assert model.config.to_dict() == dense.config.to_dict()        # the config is untouched
        same_types = all(type(model.get_submodule(n)).__name__ == types[n] for n in restored)
        w_err = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(),
                                                                dense.state_dict().values()))
        exp_err = float((_logits(model, ids) - ref).abs().max())
        sd = torch.cat([v.reshape(-1) for v in model.state_dict().values()])
        table = [torch.zeros_like(sd) for _ in range(world)]
        dist.all_gather(table, sd)
        identical = all(torch.equal(t, table[0]) for t in table)
        reload_err, config_diff = None, {}
        if rank == 0:
            model.save_pretrained(f"{tmp}/{fam}")
            back = cls.from_pretrained(f"{tmp}/{fam}", dtype=torch.float64).eval()
            reload_err = float((_logits(back, ids) - _logits(model, ids)).abs().max())
            a, b = back.config.to_dict(), model.config.to_dict()
            config_diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
                           if a.get(k) != b.get(k) and k != "_name_or_path"}
        out[fam] = dict(names=names, converted=[c.name for c in done], edges=len(edges), err=err,
                        max_approx=max(c.approx_error for c in done), same_types=same_types,
                        restored=len(restored), w_err=w_err, exp_err=exp_err, identical=identical,
                        reload_err=reload_err, config_diff=str(config_diff))
    # ranks fed different inputs: both raise, naming the layer and the fix
    torch.manual_seed(0)
    config, cls, targets = _families()["llama"]
    model = cls(config).double().eval()
    convert_modules(model, targets, ghost_dim=H // world, group=None)
    try:
        _logits(model, ids + rank)
        out["mismatch"] = "no error"
    except RuntimeError as e:
        out["mismatch"] = str(e)
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return run_ranks(_family_rank, 2, str(tmp_path_factory.mktemp("hf")), timeout=600)


@pytest.mark.parametrize("fam", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox", "falcon",
                                 "bloom", "phi", "phi3", "opt"])
def test_family_converts_exactly_and_exports_back(families, fam):
    for r in families:
        f = r[fam]
        assert f["converted"] == f["names"] and len(f["names"]) == 2, f["names"]
        assert f["edges"] >= 4 and f["restored"] == f["edges"]
        assert f["max_approx"] < 1e-12
        assert f["err"] < 1e-10, (fam, f["err"])
        assert f["same_types"] and f["identical"]
        assert f["w_err"] < 1e-12 and f["exp_err"] < 1e-10, (fam, f["w_err"], f["exp_err"])
    assert families[0][fam]["reload_err"] < 1e-12
    assert families[0][fam]["config_diff"] == "{}"


def test_different_inputs_in_a_group_raise_on_every_rank(families):
    for r in families:
        msg = r["mismatch"]
        assert "model.layers.0.mlp." in msg and "differs across the ranks of the phantom group [0, 1]" in msg, msg
        assert "data-parallel rank" in msg
