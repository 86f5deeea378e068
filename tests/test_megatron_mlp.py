"""PhantomMLP against a float64 single-process reference, on real gloo ranks.

The reference rebuilds every rank's initial blocks from the seed (``init.master_blocks``) as
float64 leaves, assembles the dense weights ``W[i,j] = D_ij C_j`` (``blocks.dense_from_blocks``)
and runs the transformer MLP densely with autograd, in one process without collectives. The
phantom MLP runs in float64 on p ranks, so outputs, the input grad and every parameter grad
must match to rounding (1e-10): any error in a collective, a block order or a gate/up
interleave is of order 1.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks

megatron = pytest.importorskip("megatron.core")

TOL = 1e-10
H, FFN, K, S, B = 16, 24, 3, 4, 2
CASES = [  # (gated, bias, sequence_parallel)
    (False, True, False), (True, False, False), (True, True, False), (False, False, True),
]


def _reference(x, w_out, seed1, seed2, p, gated, bias, act):
    """Dense float64 MLP from the seeded blocks; returns (out, dx, {rank: {param: grad}})."""
    from phantom_plugin import blocks, init
    fc1_out = 2 * FFN if gated else FFN
    leaves = {}

    def dense(seed, n_in, n_out, name):
        per_rank = init.master_blocks(seed, n_in, n_out, K, p)
        for r, blk in enumerate(per_rank):
            for k, v in blk.items():
                leaves[(r, f"{name}.{k}")] = v.to(torch.float64).requires_grad_(True)
        w = blocks.dense_from_blocks([leaves[(r, f"{name}.local_weight")] for r in range(p)],
                                     [leaves[(r, f"{name}.compressor")] for r in range(p)],
                                     [leaves[(r, f"{name}.decompressor")] for r in range(p)])
        b = torch.cat([leaves[(r, f"{name}.bias")] for r in range(p)]) if bias else None
        if not bias:
            for r in range(p):
                del leaves[(r, f"{name}.bias")]
        return w, b

    w1, b1 = dense(seed1, H, fc1_out, "linear_fc1")                 # rows: [gate_r; up_r] per rank
    w2, b2 = dense(seed2, FFN, H, "linear_fc2")
    x = x.clone().requires_grad_(True)
    a = x @ w1.t() + (b1 if bias else 0)                            # [s, b, fc1_out]
    if gated:
        chunks = a.chunk(p, dim=-1)
        a = torch.cat([act(c.chunk(2, -1)[0]) * c.chunk(2, -1)[1] for c in chunks], dim=-1)
    else:
        a = act(a)
    out = a @ w2.t() + (b2 if bias else 0)
    (out * w_out).sum().backward()
    grads = {}
    for (r, name), v in leaves.items():
        grads.setdefault(r, {})[name] = v.grad
    return out.detach(), x.grad, grads


def _case(world, gated, bias, sp):
    """One case of :data:`CASES` on this rank: ``(mlp, x, w_out, ref_out, ref_dx, ref_grads)``, the
    float64 ``PhantomMLP`` (seed 7, layer 3), the full input and output weights, and the reference."""
    import torch.nn.functional as F
    import megatron_utils as mu
    from phantom_plugin.init import derive_seed
    from phantom_plugin.megatron import PhantomMLP
    cfg = mu.make_config(world, hidden_size=H, ffn_hidden_size=FFN, gated_linear_unit=gated,
                         add_bias_linear=bias, activation_func=F.silu if gated else F.gelu,
                         params_dtype=torch.float64, sequence_parallel=sp)
    mlp = PhantomMLP(cfg, ghost_dim=K, seed=7)                      # group from parallel_state
    mlp.set_layer_number(3)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    w_out = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    seeds = derive_seed(7, 3, "linear_fc1"), derive_seed(7, 3, "linear_fc2")
    return (mlp, x, w_out) + _reference(x, w_out, *seeds, world, gated, bias, cfg.activation_func)


def _mlp_ranks(rank, world):
    results = []
    for gated, bias, sp in CASES:
        mlp, x, w_out, ref_out, ref_dx, ref_grads = _case(world, gated, bias, sp)
        m = S // world
        x_in = x[rank * m:(rank + 1) * m] if sp else x
        x_in = x_in.clone().requires_grad_(True)
        out, out_bias = mlp(x_in, padding_mask=None)               # extra kwargs accepted
        assert out_bias is None
        (out * (w_out[rank * m:(rank + 1) * m] if sp else w_out)).sum().backward()
        exp_out = ref_out[rank * m:(rank + 1) * m] if sp else ref_out
        exp_dx = ref_dx[rank * m:(rank + 1) * m] if sp else ref_dx
        errs = {"out": (out.detach() - exp_out).abs().max().item(),
                "dx": (x_in.grad - exp_dx).abs().max().item()}
        names = dict(mlp.named_parameters())
        assert set(names) == set(ref_grads[rank]), (set(names), set(ref_grads[rank]))
        for name, prm in names.items():
            assert prm.tensor_model_parallel, name
            errs[name] = (prm.grad - ref_grads[rank][name]).abs().max().item()
        results.append((errs, out.detach().tolist(), tuple(out.shape)))  # plain data through the queue
    return results


def _all_ranks(rank, world):
    """One spawn for the whole module (starting ranks that import megatron costs seconds each)."""
    import megatron_utils as mu
    mu.init_megatron(world)
    return {"mlp": _mlp_ranks(rank, world), "bad_args": _bad_args_ranks(rank, world)}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_all_ranks, 2)


def test_phantom_mlp_matches_dense_reference_on_two_ranks(ranks):
    per_rank = [r["mlp"] for r in ranks]
    for case_idx, case in enumerate(CASES):
        for rank, results in enumerate(per_rank):
            errs, _, shape = results[case_idx]
            assert max(errs.values()) < TOL, (case, rank, errs)
            assert shape == ((S // 2, B, H) if case[2] else (S, B, H))
        if not case[2]:   # replicated output: bit-identical on every TP rank
            assert per_rank[0][case_idx][1] == per_rank[1][case_idx][1], case


def _bad_args_ranks(rank, world):
    import megatron_utils as mu
    from phantom_plugin import CommCounter
    from phantom_plugin.megatron import PhantomMLP
    cfg = mu.make_config(world, hidden_size=H, ffn_hidden_size=FFN)
    messages = []
    with CommCounter() as counter:
        for kwargs in ({"ghost_dim": H}, {"ghost_dim": 0}, {"ghost_dim": K, "is_expert": True},
                       {"ghost_dim": K, "ffn_hidden_size": 25}):
            try:
                PhantomMLP(cfg, **kwargs)
            except ValueError as e:
                messages.append(str(e))
    return messages, len(counter.records)


def test_bad_arguments_fail_on_every_rank_before_any_collective(ranks):
    for messages, collectives in (r["bad_args"] for r in ranks):
        assert collectives == 0
        assert len(messages) == 4
        assert "ghost_dim=16 exceeds" in messages[0] and "lower ghost_dim" in messages[0]
        assert "ghost_dim must be an integer >= 1" in messages[1]
        assert "is_expert" in messages[2]
        assert "ffn_hidden_size=25 is not divisible by the tensor-parallel size 2" in messages[3]


def test_single_process_without_distributed_is_dense():
    """p = 1 without torch.distributed: a plain dense MLP, no ghosts, output_bias None."""
    import megatron_utils as mu
    from phantom_plugin.megatron import PhantomMLP
    cfg = mu.make_config(1, hidden_size=H, ffn_hidden_size=FFN)
    mlp = PhantomMLP(cfg, ghost_dim=K)
    assert mlp.linear_fc1.compressor is None and mlp.group_size == 1
    x = torch.randn(S, B, H)
    out, bias = mlp(x)
    w1, b1, w2, b2 = mlp.to_dense()
    ref = torch.nn.functional.linear(cfg.activation_func(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    assert bias is None and torch.allclose(out, ref, atol=1e-6)
    with pytest.raises(ValueError, match="ghost_dim is required"):
        PhantomMLP(cfg)
    # a plain (non-dist) state dict from another TP size is refused by the layout in extra state
    from phantom_plugin.megatron import PhantomCheckpointError
    state = {**mlp.layout(), "phantom_tp_size": 2}
    with pytest.raises(PhantomCheckpointError, match="saved at tensor-parallel size 2 .* runs at tensor-parallel size 1"):
        mlp.set_extra_state(state)
    assert mlp.state_dict()["_extra_state"]["phantom_tp_size"] == 1


def test_layer_seeds_are_derived_per_layer_number_and_linear():
    import megatron_utils as mu
    from phantom_plugin.init import derive_seed
    from phantom_plugin.megatron import PhantomMLP
    cfg = mu.make_config(1, hidden_size=H, ffn_hidden_size=FFN)
    seeds = set()
    for number in (1, 2):
        mlp = PhantomMLP(cfg, ghost_dim=K, seed=5)
        mlp.set_layer_number(number)
        pair = mlp.linear_fc1.seed, mlp.linear_fc2.seed
        assert pair == (derive_seed(5, number, "linear_fc1"), derive_seed(5, number, "linear_fc2"))
        seeds.update(pair)
    assert len(seeds) == 4
