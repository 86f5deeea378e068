"""``phantom_plugin.param_groups``: every parameter in exactly one group of the right kind, the
documented multipliers, and an Adam step that moves each kind by ``lr * multiplier`` (float64, on
real gloo ranks: the phantom blocks exist only at ``p > 1``)."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_utils import run_ranks
from phantom_plugin import PhantomFFN, param_groups
from phantom_plugin.bench.workload import make_optimizer
from phantom_plugin.optim import (DEFAULT_PARAMETRIZATION, KINDS, PARAMETRIZATIONS, factor_lr_mult,
                                  layer_multipliers)

WIDTH, K = 16, 2


class _Mixed(nn.Module):
    """A phantom FFN between a dense layer and a norm, one frozen and one shared parameter."""

    def __init__(self, group, init="balanced"):
        super().__init__()
        self.inp = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
        self.ffn = PhantomFFN(WIDTH, 2, ghost_dim=K, group=group, dtype=torch.float64, seed=3, init=init)
        self.norm = nn.LayerNorm(WIDTH, dtype=torch.float64)
        self.frozen = nn.Parameter(torch.ones(3, 3, dtype=torch.float64), requires_grad=False)
        self.alias = self.inp                                       # the same parameters twice

    def forward(self, x):
        return self.norm(self.ffn(self.inp(x)))


def _check_groups(rank, p):
    torch.manual_seed(0)                                             # same dense params on every rank
    model = _Mixed(dist.group.WORLD)
    lr = 1e-2
    groups = param_groups(model, lr, weight_decay=0.1)
    ids = [id(t) for g in groups for t in g["params"]]
    trainable = {id(t) for t in model.parameters() if t.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable       # each once, frozen left out
    kinds = {id(t): g["kind"] for g in groups for t in g["params"]}
    assert DEFAULT_PARAMETRIZATION == "auto"                          # balanced-init layers: "balanced"
    default = layer_multipliers("balanced", WIDTH, K, p)
    factor = factor_lr_mult(K, WIDTH // p)
    for layer in model.ffn.layers:
        assert kinds[id(layer.local_weight)] == "local"
        assert kinds[id(layer.compressor)] == "compressor" and kinds[id(layer.decompressor)] == "decompressor"
        assert kinds[id(layer.bias)] == "bias"
    assert kinds[id(model.inp.weight)] == "other" and kinds[id(model.norm.weight)] == "bias"
    for g in groups:
        want = default.get(g["kind"], 1.0)
        assert g["lr_mult"] == pytest.approx(want) and g["lr"] == pytest.approx(lr * want)
        assert g["weight_decay"] == (0.0 if g["kind"] == "bias" else 0.1)
    assert [g["kind"] for g in groups] == sorted((g["kind"] for g in groups), key=KINDS.index)

    # one Adam step: each entry moves by lr * mult * g / (|g| + eps) (bias-corrected first step)
    over = param_groups(model, lr, multipliers={"decompressor": 3.0, "local": 0.5}, parametrization="balanced")
    mults = {id(t): g["lr_mult"] for g in over for t in g["params"]}
    layer = model.ffn.layers[0]
    assert mults[id(layer.decompressor)] == 3.0 and mults[id(layer.local_weight)] == 0.5
    assert mults[id(layer.compressor)] == pytest.approx(factor)
    opt = torch.optim.Adam(over, lr=lr, eps=1e-12)
    x = torch.randn(4, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).sum().backward()
    before = {id(t): t.detach().clone() for t in model.parameters()}
    grads = {id(t): t.grad.clone() for t in model.parameters() if t.grad is not None}
    opt.step()
    for t in model.parameters():
        if id(t) in grads and id(t) in mults:
            g = grads[id(t)]
            expected = before[id(t)] - lr * mults[id(t)] * g / (g.abs() + 1e-12)
            torch.testing.assert_close(t.detach(), expected, rtol=0, atol=1e-9)
    # the bench's optimizer takes the same groups
    bench = make_optimizer(model, lr)
    assert sorted(g["kind"] for g in bench.param_groups) == sorted(g["kind"] for g in param_groups(model, lr))
    return True


@pytest.mark.parametrize("p", [2, 4])
def test_groups_kinds_multipliers_and_adam_step(p):
    assert run_ranks(_check_groups, p) == [True] * p


# exact lr multipliers of the factors of a PhantomFFN(16, k=2): n_in/p = 16/p, D's fan-in (p-1)k
_EXACT = {
    2: {"balanced": (1.0, 0.8, 0.8), "spectral": (1.0, 0.8, 1.6), "mup": (2.0, 2.0, 8.0),
        "mup-decompressor": (1.0, 0.8, 8.0)},
    4: {"balanced": (1.0, 2 / 3, 2 / 3), "spectral": (1.0, 2 / 3, 4 / 3), "mup": (4.0, 4.0, 8 / 3),
        "mup-decompressor": (1.0, 2 / 3, 8 / 3)},
}


def _check_parametrizations(rank, p):
    torch.manual_seed(0)
    model = _Mixed(dist.group.WORLD)
    for name, (local, comp, decomp) in _EXACT[p].items():
        groups = param_groups(model, 1e-3, parametrization=name)
        lrs = {g["kind"]: g["lr"] for g in groups}
        assert len(groups) == len(lrs), name                           # one group per kind here
        assert lrs == pytest.approx({"local": 1e-3 * local, "compressor": 1e-3 * comp,
                                     "decompressor": 1e-3 * decomp, "bias": 1e-3, "other": 1e-3}), name
        over = param_groups(model, 1e-3, parametrization=name, multipliers={"decompressor": 5.0})
        assert {g["kind"]: g["lr_mult"] for g in over}["decompressor"] == 5.0
    # the default "auto": "balanced" for balanced-init layers, "spectral" for init="spectral" ones
    spectral = _Mixed(dist.group.WORLD, init="spectral")
    for m, name in ((model, "balanced"), (spectral, "spectral")):
        got = {g["kind"]: g["lr_mult"] for g in param_groups(m, 1e-3)}
        assert got == pytest.approx(dict(zip(("local", "compressor", "decompressor"), _EXACT[p][name]),
                                         bias=1.0, other=1.0)), name
    return True


@pytest.mark.parametrize("p", [2, 4])
def test_parametrizations_exact_group_lrs(p):
    assert run_ranks(_check_parametrizations, p) == [True] * p


@pytest.mark.fast
def test_layer_multipliers_formulas():
    assert set(PARAMETRIZATIONS) == {"auto", "balanced", "spectral", "mup", "mup-decompressor"}
    assert DEFAULT_PARAMETRIZATION in PARAMETRIZATIONS
    assert layer_multipliers("mup", 1024, 16, 2) == {"local": 2.0, "compressor": 2.0, "decompressor": 64.0}
    assert layer_multipliers("mup-decompressor", 512, 32, 4) == pytest.approx(
        {"local": 1.0, "compressor": 1 / (1 + 32 / 128), "decompressor": 512 / 96})
    assert layer_multipliers("spectral", 512, 32, 4)["decompressor"] == pytest.approx(2 / (1 + 32 / 128))
    for name in set(PARAMETRIZATIONS) - {"auto"}:                      # p = 1: a dense layer
        assert layer_multipliers(name, 64, 8, 1) == {"local": 1.0, "compressor": 1.0, "decompressor": 1.0}


@pytest.mark.fast
def test_unknown_parametrization_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown parametrization 'mu-p'; parametrization must be one of "
                                         r"\['auto', 'balanced', 'spectral', 'mup', 'mup-decompressor'\]"):
        param_groups(nn.Linear(2, 2), 1e-3, parametrization="mu-p")
    with pytest.raises(ValueError, match="depends on each layer's init"):
        layer_multipliers("auto", 16, 2, 2)


@pytest.mark.fast
def test_factor_multiplier_rule():
    assert factor_lr_mult(512, 512) == 0.5
    assert factor_lr_mult(32, 1024) == pytest.approx(1 / (1 + 1 / 32))
    assert factor_lr_mult(1, 10 ** 6) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.fast
def test_single_process_and_plain_models():
    ffn = PhantomFFN(8, 2, ghost_dim=1, seed=0)                      # p = 1: a dense model
    assert {g["kind"] for g in param_groups(ffn, 1e-3)} == {"local", "bias"}
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    groups = param_groups(plain, 1e-3, weight_decay=0.01)
    assert [(g["kind"], len(g["params"]), g["weight_decay"]) for g in groups] == [("bias", 1, 0.0), ("other", 2, 0.01)]


@pytest.mark.fast
@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0}, "lr must be > 0"),
    ({"lr": 1e-3, "weight_decay": -1.0}, "weight_decay must be >= 0"),
    ({"lr": 1e-3, "multipliers": {"ghosts": 2.0}}, "unknown kind 'ghosts'"),
    ({"lr": 1e-3, "multipliers": {"compressor": 0.0}}, r"multipliers\['compressor'\] must be a number > 0"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        param_groups(nn.Linear(2, 2), **kwargs)
