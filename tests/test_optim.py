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
from phantom_plugin.optim import KINDS, factor_lr_mult

WIDTH, K = 16, 2


class _Mixed(nn.Module):
    """A phantom FFN between a dense layer and a norm, one frozen and one shared parameter."""

    def __init__(self, group):
        super().__init__()
        self.inp = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
        self.ffn = PhantomFFN(WIDTH, 2, ghost_dim=K, group=group, dtype=torch.float64, seed=3)
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
    factor = factor_lr_mult(K, WIDTH // p)
    for layer in model.ffn.layers:
        assert kinds[id(layer.local_weight)] == "local"
        assert kinds[id(layer.compressor)] == "compressor" and kinds[id(layer.decompressor)] == "decompressor"
        assert kinds[id(layer.bias)] == "bias"
    assert kinds[id(model.inp.weight)] == "other" and kinds[id(model.norm.weight)] == "bias"
    for g in groups:
        want = factor if g["kind"] in ("compressor", "decompressor") else 1.0
        assert g["lr_mult"] == pytest.approx(want) and g["lr"] == pytest.approx(lr * want)
        assert g["weight_decay"] == (0.0 if g["kind"] == "bias" else 0.1)
    assert [g["kind"] for g in groups] == sorted((g["kind"] for g in groups), key=KINDS.index)

    # one Adam step: each entry moves by lr * mult * g / (|g| + eps) (bias-corrected first step)
    over = param_groups(model, lr, multipliers={"decompressor": 3.0, "local": 0.5})
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
