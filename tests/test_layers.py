"""PhantomLinear / PhantomFFN against a float64 single-process dense reference, on real gloo ranks.

The reference rebuilds every rank's blocks as leaf tensors in one process, assembles the dense
weight ``W[i,i] = L_i, W[i,j] = D_ij C_j`` with autograd (``blocks.dense_from_blocks``) and
differentiates ``sum(y * dy)``; each rank compares its output shard, input-shard grad and every
parameter grad with the reference's. float64 throughout, so the tolerance is 1e-10 (rounding only).
"""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from phantom_plugin import CommCounter, PhantomFFN, PhantomLinear, init
from phantom_plugin.modeling import counts
from phantom_plugin.blocks import dense_from_blocks

N_IN, N_OUT = 12, 24       # divisible by 1..4, in != out


def _reference_grads(rank, p, layer, x, dy):
    """Reference (y, dx, {param: grad}) for rank ``rank`` from everyone's blocks."""
    g = dist.group.WORLD
    from phantom_plugin import comm

    def gather(t):
        return [b.clone().requires_grad_() for b in comm.all_gather(t.detach(), g).unbind(0)]
    loc = gather(layer.local_weight)
    comp = gather(layer.compressor) if p > 1 else [None] * p
    dec = gather(layer.decompressor) if p > 1 else [None] * p
    bias = gather(layer.bias) if layer.bias is not None else None
    xr = x.detach().clone().requires_grad_()
    w = dense_from_blocks(loc, comp, dec)
    y = xr @ w.t()
    if bias is not None:
        y = y + torch.cat(bias)
    (y * dy).sum().backward()
    mo, mi = N_OUT // p, N_IN // p
    grads = {"local_weight": loc[rank].grad}
    if p > 1:
        grads["compressor"] = comp[rank].grad
        grads["decompressor"] = dec[rank].grad
    if bias is not None:
        grads["bias"] = bias[rank].grad
    return y[..., rank * mo:(rank + 1) * mo], xr.grad[..., rank * mi:(rank + 1) * mi], grads


def _check_linear(rank, p):
    g = dist.group.WORLD
    checked = 0
    for k in sorted({1, max(1, N_IN // p // 2), N_IN // p}):
        for bias in (True, False):
            layer = PhantomLinear(N_IN, N_OUT, ghost_dim=k, group=g, bias=bias, dtype=torch.float64, seed=7)
            gen = torch.Generator().manual_seed(11)
            x = torch.randn(2, 3, N_IN, dtype=torch.float64, generator=gen)        # leading dims [2, 3]
            dy = torch.randn(2, 3, N_OUT, dtype=torch.float64, generator=gen)
            y_ref, dx_ref, grads_ref = _reference_grads(rank, p, layer, x, dy)
            mi, mo = N_IN // p, N_OUT // p
            xs = x[..., rank * mi:(rank + 1) * mi].clone().requires_grad_()
            y = layer(xs)
            assert y.shape == (2, 3, mo)
            (y * dy[..., rank * mo:(rank + 1) * mo]).sum().backward()
            torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
            torch.testing.assert_close(xs.grad, dx_ref, rtol=0, atol=1e-10)
            for name, ref in grads_ref.items():
                torch.testing.assert_close(getattr(layer, name).grad, ref, rtol=0, atol=1e-10,
                                           msg=lambda m, name=name, k=k, bias=bias: f"{name} k={k} bias={bias}: {m}")
            # to_dense is the exact dense equivalent
            w, b = layer.to_dense()
            full = x @ w.t() + (b if b is not None else 0)
            torch.testing.assert_close(full[..., rank * mo:(rank + 1) * mo], y.detach(), rtol=0, atol=1e-10)
            checked += 1
    return checked


@pytest.mark.parametrize("p", [1, pytest.param(2, marks=pytest.mark.fast), 3, 4])
def test_linear_forward_and_every_gradient_match_dense_reference(p):
    assert run_ranks(_check_linear, p) == [_expected_cases(p)] * p


def _expected_cases(p):
    return 2 * len({1, max(1, N_IN // p // 2), N_IN // p})


def _check_init(rank, p):
    layer = PhantomLinear(N_IN, N_OUT, ghost_dim=2, group=dist.group.WORLD, seed=5)
    ref = init.master_blocks(5, N_IN, N_OUT, 2, p)[rank]
    for name, t in ref.items():
        assert torch.equal(getattr(layer, name).detach(), t), name
    # local blocks are the diagonal blocks of one dense master, whatever p
    w0 = init.dense_master(5, N_IN, N_OUT)
    mi, mo = N_IN // p, N_OUT // p
    assert torch.equal(layer.local_weight.detach(), w0[rank * mo:(rank + 1) * mo, rank * mi:(rank + 1) * mi])
    tags = {n: getattr(t, "tensor_model_parallel", False) for n, t in layer.named_parameters()}
    assert all(tags.values()), tags
    return True


@pytest.mark.parametrize("p", [1, 3])
def test_init_is_deterministic_slices_of_a_master_and_tagged(p):
    run_ranks(_check_init, p)


def _check_bf16(rank, p):
    g = dist.group.WORLD
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        layer = PhantomLinear(64, 32, ghost_dim=4, group=g, dtype=dtype, seed=3)
        x = torch.randn(16, 64 // p, generator=torch.Generator().manual_seed(rank)).to(dtype).requires_grad_()
        y = layer(x)
        y.float().pow(2).sum().backward()
        out[dtype] = [y.detach().float(), x.grad.float()] + [t.grad.float() for t in layer.parameters()]
    for a, b in zip(out[torch.float32], out[torch.bfloat16]):
        # bf16 keeps 8 bits of mantissa (rel. 2^-8 = 0.4% per rounding); sums of 32-64 terms
        # accumulate a few of those: 3% of the tensor's scale bounds it with margin.
        err = (a - b).abs().max() / a.abs().max()
        assert err < 3e-2, float(err)
    return True


def test_bf16_matches_fp32_within_tolerance():
    run_ranks(_check_bf16, 2)


def _check_from_dense(rank, p):
    import numpy as np
    g = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N_OUT, N_IN, dtype=torch.float64, generator=gen)
    b = torch.randn(N_OUT, dtype=torch.float64, generator=gen)
    full = PhantomLinear.from_dense(w, b, ghost_dim=N_IN // p, group=g)
    w2, b2 = full.to_dense()
    torch.testing.assert_close(w2, w, rtol=0, atol=1e-12)
    assert torch.equal(b2, b) and full.approx_error < 1e-12
    if p == 1:
        return True
    k = 1
    part = PhantomLinear.from_dense(w, b, ghost_dim=k, group=g)
    w3, _ = part.to_dense()
    actual = float((w3 - w).norm() / w.norm())
    # numpy optimum: per block column, the tail singular values of the stacked off-diagonal blocks
    a, mo, mi, tail = w.numpy(), N_OUT // p, N_IN // p, 0.0
    for j in range(p):
        col = np.concatenate([a[i * mo:(i + 1) * mo, j * mi:(j + 1) * mi] for i in range(p) if i != j])
        s = np.linalg.svd(col, compute_uv=False)
        tail += float((s[k:] ** 2).sum())
    optimum = (tail ** 0.5) / float(np.linalg.norm(a))
    assert abs(actual - optimum) < 1e-12 and abs(part.approx_error - optimum) < 1e-12
    assert optimum > 0.1   # a random matrix is far from rank 1: the check is not vacuous
    return True


@pytest.mark.parametrize("p", [1, 2, 3])
def test_from_dense_round_trip_and_svd_optimum(p):
    run_ranks(_check_from_dense, p)


def _check_ffn(rank, p, width, depth, k, batch):
    g = dist.group.WORLD
    ffn = PhantomFFN(width, depth, ghost_dim=k, group=g, dtype=torch.float64, seed=1)
    dense = ffn.to_dense()
    x = torch.randn(batch, width, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with CommCounter() as counter:
        y = ffn(x)
        y.pow(2).sum().backward()
    records = list(counter.records)
    h = x
    for l, (w, b) in enumerate(dense):
        h = h @ w.t() + b
        if l < depth - 1:
            h = torch.nn.functional.gelu(h)
    torch.testing.assert_close(y, h, rtol=0, atol=1e-10)       # output replicated on every rank
    model = counts.phantom_ffn_cost(width, depth, p=p, k=k, batch=batch, dtype_bytes=8)
    assert sum(r.sent_bytes for r in records) == model.bytes_sent
    assert sorted((r.op, r.sent_bytes) for r in records) == sorted((m.op, m.bytes_sent) for m in model.messages)
    ghost = [r for r in records if r.tag.startswith("ghosts")]
    assert len(ghost) == 2 * depth and all(r.numel == p * k * batch for r in ghost)
    edges = [r for r in records if not r.tag.startswith("ghosts")]
    assert [(r.tag, r.numel) for r in edges] == [("gather_fwd", width * batch)]
    return True


@pytest.mark.parametrize("p", [pytest.param(2, marks=pytest.mark.fast), 4])
def test_ffn_matches_dense_and_sends_exactly_the_cost_model(p):
    run_ranks(_check_ffn, p, 16, 3, 2, 5)


def test_derive_seed_is_deterministic_distinct_and_in_range():
    d = init.derive_seed
    # pinned values: the rule is the same in every process, platform and Python release (no hash())
    assert d(0) == 5882227149313166412
    assert d(1234, 3, "linear_fc1") == 8045027545868842691
    keys = [(), (0,), (1,), ("0",), ("1",), (0, 1), (1, 0), ("a/b",), ("a", "b"), ("",), ("", ""),
            (3, "linear_fc1"), (3, "linear_fc2"), (4, "linear_fc1"), ("blocks.0.mlp.fc1",),
            ("blocks.0.mlp.fc2",), (-1,), (2 ** 70,)]
    seeds = [d(s, *k) for s in (0, 1, -1, 2 ** 40) for k in keys]
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(s, int) and 0 <= s < 2 ** 63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))
    torch.tensor(seeds, dtype=torch.int64)                  # seeds travel in int64 setup all-gathers
    with pytest.raises(TypeError, match="integers or strings"):
        d(0, 1.5)
    # its users: layer l of a PhantomFFN, fc1/fc2 of a Megatron MLP (tests/test_megatron_mlp.py)
    ffn = PhantomFFN(8, 3, ghost_dim=1, seed=4)
    assert ffn.seed == 4 and [layer.seed for layer in ffn.layers] == [d(4, l) for l in range(3)]
