"""Megatron-core GPT models with phantom MLPs on real gloo ranks (CPU).

One 2-rank spawn (TP=2) covers training, grad-norm clipping, conversion and the single-pipeline
reference; one 4-rank spawn runs TP=2 x PP=2 with a hand-written send/recv pipeline step (megatron's
own schedules hard-code CUDA). Starting ranks that import megatron costs seconds each, hence the
module-scoped fixtures.
"""
from __future__ import annotations

import numpy as np
import pytest

from dist_utils import run_ranks

pytest.importorskip("megatron.core")

SEQ, BATCH = 16, 4


def _phantom_spec(k=4):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from phantom_plugin.megatron import with_phantom_mlp
    return with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=k)


def _train(rank, world, gated=False):
    """TP=2 GPT built from with_phantom_mlp(get_gpt_layer_local_spec()) trains on stdlib bytes
    (GELU with bias, or SwiGLU without bias)."""
    import torch
    import torch.nn.functional as F
    import megatron_utils as mu
    from phantom_plugin.megatron import PhantomMLP, count_phantom_mlps
    torch.manual_seed(0)
    extra = dict(gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False) if gated else {}
    model = mu.build_gpt(mu.make_config(world, **extra), _phantom_spec(), seq=SEQ)
    assert all(isinstance(layer.mlp, PhantomMLP) for layer in model.decoder.layers)
    assert count_phantom_mlps(model) == len(model.decoder.layers) == 2
    assert model.decoder.layers[0].mlp.gated is gated
    hidden = []
    model.decoder.register_forward_hook(lambda m, i, out: hidden.append(out.detach()))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for tok, lab, pos in mu.batches(8, BATCH, SEQ):
        loss = mu.gpt_loss(model, tok, lab, pos)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "hidden": hidden[-1].numpy()}


def _grad_norm(rank, world):
    """Megatron's grad-norm path (its parameter filter and get_grad_norm_fp32) against all grads."""
    import megatron.core
    import torch
    import megatron_utils as mu
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from phantom_plugin.megatron._version import parse_version
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared
    model = mu.build_gpt(mu.make_config(world), _phantom_spec(), seq=SEQ)
    tok, lab, pos = mu.batches(1, BATCH, SEQ)[0]
    mu.gpt_loss(model, tok, lab, pos).backward()
    grads = [p.grad for p in model.parameters()
             if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
    group = parallel_state.get_model_parallel_group()
    if parse_version(megatron.core.__version__) < (0, 19):
        # norm_type 3: megatron's 2-norm path allocates on CUDA; the counting logic is the same
        norm = get_grad_norm_fp32(grads, norm_type=3, grad_stats_parallel_group=group)
    else:
        # 0.19 allocates the accumulator on CUDA for every norm type: the same sum and
        # all-reduce over the model-parallel group, over the grads megatron's filters keep
        total = torch.tensor([sum(float((g.double().abs() ** 3).sum()) for g in grads)], dtype=torch.float64)
        torch.distributed.all_reduce(total, group=group)
        norm = total.item() ** (1 / 3)
    phantom = {n: bool(getattr(p, "tensor_model_parallel", False)) for n, p in model.named_parameters()
               if ".mlp." in n}
    return {"norm": norm, "phantom_tp_attr": phantom,
            "grads": {n: p.grad.numpy().copy() for n, p in model.named_parameters()}}


def _convert(rank, world):
    """Stock TP=2 GPT (SwiGLU, bias) -> phantom by SVD -> dense again; logits follow exactly at k=h/p."""
    import torch
    import torch.nn.functional as F
    import megatron_utils as mu
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from phantom_plugin.megatron import PhantomMLP, convert_to_phantom, to_dense
    cfg = mu.make_config(world, gated_linear_unit=True, activation_func=F.silu)
    tok, lab, pos = mu.batches(1, BATCH, SEQ)[0]
    out = {}
    for k in (16, 2):                                   # 16 = h/p: exact; 2: lossy, reported
        torch.manual_seed(5)
        model = mu.build_gpt(cfg, get_gpt_layer_local_spec(), seq=SEQ)
        mu.set_params_by_name(model, rank, scale=0.1)
        with torch.no_grad():
            before = model(tok, pos, None)
            report = convert_to_phantom(model, ghost_dim=k)
            assert all(isinstance(layer.mlp, PhantomMLP) for layer in model.decoder.layers)
            after = model(tok, pos, None)
            assert to_dense(model) == 2
            back = model(tok, pos, None)
        out[k] = {"report": [(r.fc1_error, r.fc2_error, r.dense_params, r.phantom_params, str(r))
                             for r in report],
                  "phantom_vs_stock": (after - before).abs().max().item(),
                  "dense_vs_phantom": (back - after).abs().max().item(),
                  "scale": before.abs().max().item()}
    return out


def _generate(rank, world):
    """Greedy tokens of a phantom GPT, then of the same model after to_dense; bad requests."""
    import torch
    import megatron_utils as mu
    from phantom_plugin.megatron import count_phantom_mlps, greedy_generate, to_dense
    model = mu.build_gpt(mu.make_config(world), _phantom_spec(), seq=SEQ)
    mu.set_params_by_name(model, rank, scale=0.3)           # varied logits: tokens depend on context
    prompt = mu.batches(1, 2, 6)[0][0]                      # [2, 6] stdlib bytes
    phantom = greedy_generate(model, prompt, SEQ - 6)       # up to max_sequence_length
    with torch.no_grad():
        logits = model(phantom[:, :-1], torch.arange(SEQ - 1).expand(2, SEQ - 1), None)  # causal
    errors = {}
    try:
        greedy_generate(model, prompt, SEQ - 5)             # one past max_sequence_length
    except ValueError as e:
        errors["too_long"] = str(e)
    try:                                                    # ranks pass different prompts
        greedy_generate(model, prompt + rank, 2)
    except ValueError as e:
        errors["differs"] = str(e)
    n_dense = to_dense(model)
    dense = greedy_generate(model, prompt, SEQ - 6)
    return {"phantom": phantom.numpy(), "dense": dense.numpy(), "converted": n_dense,
            "left": count_phantom_mlps(model), "errors": errors, "logits_shard": logits.numpy()}


def _constructor_kwargs(rank, world):
    """What 0.18+'s TransformerLayer passes (config, pg_collection, is_mtp_layer, name), and
    tp_group taking precedence over pg_collection.tp; a ghost_dim too large is refused."""
    import types
    import torch
    import torch.distributed as dist
    import megatron_utils as mu
    from phantom_plugin.megatron import PhantomMLP
    own, other = dist.new_group([0, 1]), dist.new_group([0, 1])
    cfg = mu.make_config(world)
    built = PhantomMLP(cfg, ghost_dim=2, seed=1, pg_collection=types.SimpleNamespace(tp=own),
                       is_mtp_layer=False, name="decoder.layers.0.mlp")
    first = PhantomMLP(cfg, ghost_dim=2, tp_group=other, pg_collection=types.SimpleNamespace(tp=own))
    x = torch.randn(3, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    out, bias = built(x, padding_mask=None)
    try:
        PhantomMLP(cfg, ghost_dim=17, pg_collection=types.SimpleNamespace(tp=own))   # min(32, 64)/2 = 16
        too_big = None
    except ValueError as e:
        too_big = str(e)
    return {"group_from_collection": built.tp_group is own, "tp_group_first": first.tp_group is other,
            "name": built.name, "out": out.detach().numpy(), "bias": bias, "too_big": too_big}


def _single_pipeline(rank, world):
    """The TP=2, PP=1 reference for the TP=2 x PP=2 run: same weights (by global name), one step."""
    import megatron_utils as mu
    model = mu.build_gpt(mu.make_config(world), _phantom_spec(), seq=SEQ)
    mu.set_params_by_name(model, rank)
    tok, lab, pos = mu.batches(1, BATCH, SEQ)[0]
    loss = mu.gpt_loss(model, tok, lab, pos)
    loss.backward()
    return {"loss": loss.item(), "tp_rank": rank,
            "grads": {n: p.grad.numpy().copy() for n, p in model.named_parameters()}}


def _tp2_all(rank, world):
    import megatron_utils as mu
    mu.init_megatron(world)
    return {"train": _train(rank, world), "train_swiglu": _train(rank, world, gated=True),
            "generate": _generate(rank, world), "kwargs": _constructor_kwargs(rank, world),
            "norm": _grad_norm(rank, world),
            "convert": _convert(rank, world), "pp_ref": _single_pipeline(rank, world)}


def _tp2_pp2(rank, world):
    import torch
    import torch.distributed as dist
    import megatron_utils as mu
    from megatron.core import parallel_state as ps
    mu.init_megatron(2, pp=2)
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    first, last = pp_rank == 0, pp_rank == 1
    cfg = mu.make_config(2, pp=2)
    model = mu.build_gpt(cfg, _phantom_spec(), seq=SEQ, pre_process=first, post_process=last)
    offset = pp_rank * cfg.num_layers // 2
    mu.set_params_by_name(model, tp_rank, layer_offset=offset)
    tok, lab, pos = mu.batches(1, BATCH, SEQ)[0]
    loss = None
    if first:
        act = model(tok, pos, None)                                    # [s, b, h]
        dist.send(act.detach().contiguous(), ps.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(act)
        dist.recv(grad, ps.get_pipeline_model_parallel_next_rank())
        act.backward(grad)
    else:
        act = torch.empty(SEQ, BATCH, cfg.hidden_size)
        dist.recv(act, ps.get_pipeline_model_parallel_prev_rank())
        act.requires_grad_(True)
        model.set_input_tensor(act)
        loss = mu.gpt_loss(model, None, lab, pos)
        loss.backward()
        dist.send(act.grad.contiguous(), ps.get_pipeline_model_parallel_prev_rank())
        loss = loss.item()
    return {"loss": loss, "tp_rank": tp_rank, "pp_rank": pp_rank,
            "grads": {mu.global_name(n, offset): p.grad.numpy().copy() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def tp2():
    return run_ranks(_tp2_all, 2)


@pytest.mark.parametrize("run", ["train", "train_swiglu"])
def test_tp2_gpt_trains_with_falling_loss_and_identical_hidden_states(tp2, run):
    a, b = (r[run] for r in tp2)
    assert a["losses"] == b["losses"]
    assert a["losses"][-1] < a["losses"][0] - 0.3, a["losses"]
    assert np.array_equal(a["hidden"], b["hidden"])                  # replicated residual stream


def test_greedy_generation_rank_identical_and_equal_to_dense_conversion(tp2):
    a, b = (r["generate"] for r in tp2)
    assert a["phantom"].shape == (2, SEQ)
    assert np.array_equal(a["phantom"], b["phantom"])                # every TP rank, same tokens
    assert np.array_equal(a["phantom"][:, :6], b["dense"][:, :6])    # the prompt is kept
    assert len(set(a["phantom"][:, 6:].ravel().tolist())) > 2        # not a constant continuation
    for r in (a, b):
        assert np.array_equal(r["phantom"], r["dense"])              # exact conversion, same tokens
        assert r["converted"] == 2 and r["left"] == 0
        assert "exceeds the model's max_sequence_length 16" in r["errors"]["too_long"]
        assert "ranks disagree on `prompt_checksum`" in r["errors"]["differs"]
    # each generated token is the argmax of one full causal forward pass over the vocab shards
    full = np.concatenate([a["logits_shard"], b["logits_shard"]], axis=-1)    # [b, s-1, V]
    assert np.array_equal(full.argmax(-1)[:, 5:], a["phantom"][:, 6:])


def test_constructor_takes_what_newer_transformer_layers_pass(tp2):
    a, b = (r["kwargs"] for r in tp2)
    for r in (a, b):
        assert r["group_from_collection"] and r["tp_group_first"]
        assert r["name"] == "decoder.layers.0.mlp" and r["bias"] is None
        assert "ghost_dim=17 exceeds min(hidden_size, ffn_hidden_size)/p = 32/2 = 16" in r["too_big"]
    assert np.array_equal(a["out"], b["out"])                        # identical on both ranks


def test_grad_norm_counts_phantom_parameters_on_every_rank(tp2):
    norms = [r["norm"] for r in tp2]
    assert all(all(r["phantom_tp_attr"].values()) for r in norms) and norms[0]["phantom_tp_attr"]
    g0, g1 = norms[0]["grads"], norms[1]["grads"]
    total, sharded = 0.0, 0
    for name in g0:                                   # replicated grads once, sharded ones from both
        same = g0[name].shape == g1[name].shape and np.allclose(g0[name], g1[name], rtol=1e-6, atol=1e-9)
        parts = [g0[name]] if same else [g0[name], g1[name]]
        sharded += not same
        total += sum(float((np.abs(p.astype(np.float64)) ** 3).sum()) for p in parts)
    assert sharded >= 8
    ref = total ** (1 / 3)
    for r in norms:
        assert abs(r["norm"] - ref) < 1e-4 * ref, (r["norm"], ref)


def test_convert_trained_tp_mlps_to_phantom_and_back(tp2):
    for r in tp2:
        exact, lossy = r["convert"][16], r["convert"][2]
        assert len(exact["report"]) == 2 and len(lossy["report"]) == 2
        assert all(e1 < 1e-6 and e2 < 1e-6 for e1, e2, *_ in exact["report"])
        assert exact["phantom_vs_stock"] < 1e-4 * max(1.0, exact["scale"])
        assert all(e1 > 1e-2 and e2 > 1e-2 for e1, e2, *_ in lossy["report"])
        assert all(pp < dp for *_, dp, pp, _ in lossy["report"])             # fewer parameters
        for case in (exact, lossy):                                           # phantom -> dense is exact
            assert case["dense_vs_phantom"] < 1e-4 * max(1.0, case["scale"])
        assert "fc1 error" in lossy["report"][0][4]


def test_tp2_pp2_step_matches_single_pipeline(tp2):
    pp = run_ranks(_tp2_pp2, 4, timeout=240)
    ref = {r["pp_ref"]["tp_rank"]: r["pp_ref"] for r in tp2}
    losses = [r["loss"] for r in pp if r["pp_rank"] == 1]
    assert len(losses) == 2
    for loss in losses:
        assert abs(loss - ref[0]["loss"]) < 1e-5 * abs(ref[0]["loss"]), (loss, ref[0]["loss"])
    checked = 0
    for r in pp:
        for name, g in r["grads"].items():
            expected = ref[r["tp_rank"]]["grads"][name]
            assert np.allclose(g, expected, rtol=1e-4, atol=1e-6), name
            checked += ".mlp." in name
    assert checked >= 8                              # phantom grads of both stages compared
