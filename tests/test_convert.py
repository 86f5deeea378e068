"""convert_modules: layouts, exactness against the dense model, errors before any collective.

Multi-rank checks run on real gloo ranks (world size 2). The reference is the unconverted model
in float64: with ``ghost_dim = n_in/p`` for every layer the SVD initialisation is exact, so
outputs and input gradients must agree to float64 rounding (tolerance 1e-10); with a smaller
``k`` the error must equal what ``approx_error`` predicts for a single layer.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_utils import run_ranks
from phantom_plugin.convert import PhantomEdgeLinear, convert_modules, find_matches

pytestmark = pytest.mark.fast


class FcMLP(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(h, f), nn.GELU(), nn.Linear(f, h)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class NeoxMLP(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x):
        return self.dense_4h_to_h(torch.tanh(self.dense_h_to_4h(x)))


class Model(nn.Module):
    """One of each convertible layout, plus layers that must stay dense."""

    def __init__(self, h=8, f=8):
        super().__init__()
        self.embed = nn.Linear(4, h)
        self.blocks = nn.ModuleList([
            nn.ModuleDict({"norm": nn.LayerNorm(h), "mlp": FcMLP(h, f)}),
            nn.ModuleDict({"norm": nn.LayerNorm(h), "mlp": GatedMLP(h, f)}),
            nn.ModuleDict({"norm": nn.LayerNorm(h), "mlp": NeoxMLP(h, f)}),
            nn.ModuleDict({"norm": nn.LayerNorm(h),
                           "mlp": nn.Sequential(nn.Linear(h, f), nn.ReLU(), nn.Dropout(0.0),
                                                nn.Linear(f, f), nn.SiLU(), nn.Linear(f, h))}),
        ])
        self.head = nn.Linear(h, 3)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b["mlp"](b["norm"](h))
        return self.head(h)


def _exact_rank(rank, world, k):
    torch.manual_seed(0)
    dense = Model().double()
    model = copy.deepcopy(dense)
    done = convert_modules(model, ["mlp"], ghost_dim=k, group=None)
    names = [c.name for c in done]
    assert names == [f"blocks.{i}.mlp" for i in range(4)], names
    assert sum(isinstance(m, PhantomEdgeLinear) for m in model.modules()) == 10
    assert isinstance(model.embed, nn.Linear) and isinstance(model.head, nn.Linear)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd, yp = dense(xd), model(xp)
    yd.square().sum().backward()
    yp.square().sum().backward()
    out_err = float((yd - yp).abs().max())
    grad_err = float((xd.grad - xp.grad).abs().max())
    # replicated parameters (embed) get the dense gradient; phantom ones are tagged
    emb_err = float((dense.embed.weight.grad - model.embed.weight.grad).abs().max())
    tagged = {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    untagged_mlp = [n for n, p in model.named_parameters() if ".mlp." in n and n not in tagged]
    return out_err, grad_err, emb_err, max(c.approx_error for c in done), untagged_mlp, len(tagged)


def _lowrank_rank(rank, world):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64))
    dense = copy.deepcopy(seq)
    (c,) = convert_modules(seq, ["^$"], ghost_dim=2, group=None)
    x = torch.randn(64, 16, dtype=torch.float64)
    dist.broadcast(x, 0)
    # y = W x + b: output error relative to the weight error is bounded by ||x||
    rel_w = c.approx_error
    err = float((dense(x) - seq(x)).norm() / (dense[0].weight @ x.t()).norm())
    w_phantom = seq[0].phantom.to_dense()[0]
    w_err = float((w_phantom - dense[0].weight).norm() / dense[0].weight.norm())
    return rel_w, w_err, err


def _random_init_rank(rank, world):
    torch.manual_seed(rank)          # different dense weights per rank: fine for random init
    model = Model()
    convert_modules(model, [r"blocks\.0\.mlp"], ghost_dim=2, group=None, init="random", seed=7)
    w = model.blocks[0]["mlp"].fc1.phantom.to_dense()[0]
    return w.sum().item()


def _mismatch_rank(rank, world):
    torch.manual_seed(rank)
    try:
        convert_modules(Model(), ["mlp"], ghost_dim=2, group=None)
    except ValueError as e:
        return str(e)
    return "no error"


def _all_checks_rank(rank, world):
    """Every multi-rank check in one spawn (starting ranks costs more than the checks)."""
    return {"exact": _exact_rank(rank, world, 4), "lowrank": _lowrank_rank(rank, world),
            "random": _random_init_rank(rank, world), "mismatch": _mismatch_rank(rank, world)}


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_all_checks_rank, 2)


def test_exact_conversion_matches_dense_float64(two_ranks):
    # every layer has n_in/p = 4: k = 4 is exact
    for r in two_ranks:
        out_err, grad_err, emb_err, approx, untagged, ntagged = r["exact"]
        assert out_err < 1e-10 and grad_err < 1e-10 and emb_err < 1e-10, (out_err, grad_err, emb_err)
        assert approx < 1e-12
        assert untagged == [] and ntagged > 0


def test_low_rank_error_is_reported_and_real(two_ranks):
    for r in two_ranks:
        rel_w, w_err, err = r["lowrank"]
        assert 0.05 < rel_w < 1 and abs(rel_w - w_err) < 1e-10
        assert 0 < err < 1


def test_random_init_is_seeded_and_agrees_across_ranks(two_ranks):
    a, b = (r["random"] for r in two_ranks)
    assert a == b


def test_different_dense_weights_are_refused_on_every_rank(two_ranks):
    for r in two_ranks:
        assert "different dense weights" in r["mismatch"] and "torch.manual_seed" in r["mismatch"]


# --- single-process: errors raised before any collective ----------------------------------

def _model():
    torch.manual_seed(0)
    return Model()


@pytest.mark.parametrize("pattern, text", [
    (r"blocks\.0$", "cannot be converted"),                       # a ModuleDict
    (r"blocks\.0\.norm", "cannot be converted"),                  # a LayerNorm
    ("embed", "nn.Linear"),                                       # a bare Linear
])
def test_unconvertible_match_is_an_error(pattern, text):
    with pytest.raises(ValueError, match=text) as e:
        convert_modules(_model(), [pattern], ghost_dim=1, group=None)
    assert not dist.is_initialized()
    assert "Narrow the pattern" in str(e.value)


def test_sequential_with_non_elementwise_child_is_an_error():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="child '1' \\(LayerNorm\\)"):
        convert_modules(m, ["^$"], ghost_dim=1, group=None)


def test_pattern_matching_nothing_warns_and_outermost_wins():
    m = _model()
    with pytest.warns(UserWarning, match="'attention' matches no module"):
        convert_modules(m, ["attention", r"blocks\.1\.mlp"], ghost_dim=1, group=None)
    hits, unused = find_matches(_model(), ["mlp", r"mlp\.fc1"])
    assert [n for n, _ in hits] == [f"blocks.{i}.mlp" for i in range(4)] and unused == [r"mlp\.fc1"]


def test_single_process_conversion_is_the_dense_model():
    """``p = 1`` (no torch.distributed): phantom layers are plain dense ones."""
    dense = _model()
    m = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_modules(m, ["mlp"], ghost_dim=1, group=None)
    x = torch.randn(3, 4)
    torch.testing.assert_close(m(x), dense(x))


def test_random_init_seeds_each_layer_from_its_name():
    from phantom_plugin.init import derive_seed
    model = _model()
    convert_modules(model, ["mlp"], ghost_dim=2, group=None, init="random", seed=7)
    edges = [m for m in model.modules() if isinstance(m, PhantomEdgeLinear)]
    assert [m.phantom.seed for m in edges] == [derive_seed(7, m.name) for m in edges]
    assert len({m.phantom.seed for m in edges}) == len(edges) > 1


def test_bad_sizes_name_the_layer_and_the_fix():
    """Checked against the group size before any collective (p = 1 here: k <= n_in is always ok)."""
    from phantom_plugin.convert import _check_sizes, _plan
    plan = _plan("mlp", FcMLP(6, 12))
    with pytest.raises(ValueError, match=r"layer 'fc1' \(6 -> 12\): in_features=6 is not divisible by .* 4"):
        _check_sizes(plan, 4, 1)
    from phantom_plugin.convert import check_convertible
    with pytest.raises(ValueError, match=r"ghost_neurons=7 exceeds in_features/size of every converted "
                                         r"layer \(largest: '<root>.fc2', 12/2 = 6\)"):
        check_convertible(FcMLP(6, 12), ["^$"], size=2, ghost_dim=7)
    assert check_convertible(FcMLP(6, 12), ["^$"], size=2, ghost_dim=6) == ["<root>"]   # fc1 capped at 3
    with pytest.raises(ValueError, match="init must be"):
        convert_modules(FcMLP(4, 4), ["^$"], ghost_dim=1, init="svd")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        convert_modules(FcMLP(4, 4), ["("], ghost_dim=1)
