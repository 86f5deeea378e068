"""``init="spectral"``: each phantom factor at its own maximal-update scale (``init.init_scales``),
honoured by ``PhantomLinear``/``PhantomFFN`` on real gloo ranks and by ``init.master_blocks``; bad
names raise on every rank before any rank goes on."""
import math

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from phantom_plugin import PhantomFFN, PhantomLinear, init

N_IN, N_OUT, K = 16, 24, 2


@pytest.mark.fast
def test_spectral_scales_are_the_spectral_bounds_over_the_balanced_ones():
    n_in, n_out, k, p = 512, 512, 8, 2
    got = init.init_scales("spectral", n_in, n_out, k, p)
    assert got["local_weight"] == pytest.approx(math.sqrt(p))                  # 1/sqrt(n/p) over 1/sqrt(n)
    assert got["compressor"] == pytest.approx(math.sqrt(k * p / n_in))          # sqrt(k)/(n/p) over 1/sqrt(n/p)
    assert got["decompressor"] == pytest.approx((1 / math.sqrt(k)) / math.sqrt(3 / (p * k)))
    assert init.init_scales("balanced", n_in, n_out, k, p) == {"local_weight": 1.0, "compressor": 1.0,
                                                               "decompressor": 1.0}
    assert init.init_scales("spectral", n_in, n_out, k, 1)["local_weight"] == 1.0   # p = 1: a dense layer
    with pytest.raises(ValueError, match=r"unknown scheme 'mup'; init must be one of \['balanced', 'spectral'\]"):
        init.init_scales("mup", n_in, n_out, k, p)


def _check_spectral(rank, p):
    layer = PhantomLinear(N_IN, N_OUT, ghost_dim=K, group=dist.group.WORLD, seed=5, init="spectral")
    ref = init.master_blocks(5, N_IN, N_OUT, K, p, scheme="spectral")[rank]
    balanced = init.master_blocks(5, N_IN, N_OUT, K, p)[rank]
    scales = init.init_scales("spectral", N_IN, N_OUT, K, p)
    for name, t in ref.items():
        assert torch.equal(getattr(layer, name).detach(), t), name
        want = balanced[name] * scales.get(name, 1.0)                          # bias: unchanged
        torch.testing.assert_close(t, want, rtol=0, atol=0)
    assert layer.init_scheme == "spectral" and "init='spectral'" in repr(layer)
    ffn = PhantomFFN(N_IN, 2, ghost_dim=K, group=dist.group.WORLD, seed=1, init="spectral")
    assert all(l.init_scheme == "spectral" for l in ffn.layers)
    # one rank passing a bad or different init: every rank raises (no hang)
    bad = "spectral" if rank else "nope"
    with pytest.raises(ValueError, match="PhantomLinear: "):
        PhantomLinear(N_IN, N_OUT, ghost_dim=K, group=dist.group.WORLD, seed=5, init=bad)
    other = "spectral" if rank else "balanced"
    with pytest.raises(ValueError, match="init"):
        PhantomLinear(N_IN, N_OUT, ghost_dim=K, group=dist.group.WORLD, seed=5, init=other)
    return True


@pytest.mark.parametrize("p", [2, 4])
def test_spectral_layer_matches_master_blocks(p):
    assert run_ranks(_check_spectral, p) == [True] * p


@pytest.mark.fast
def test_with_phantom_mlp_passes_init_to_every_phantom_mlp():
    pytest.importorskip("megatron.core")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from phantom_plugin.megatron import with_phantom_mlp
    from phantom_plugin.megatron.mlp import PhantomMLP
    spec = with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=2, init="spectral")
    assert spec.submodules.mlp.module is PhantomMLP and spec.submodules.mlp.params["init"] == "spectral"
    plain = with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=2)
    assert "init" not in plain.submodules.mlp.params                  # the default: spec unchanged
    with pytest.raises(ValueError, match=r"with_phantom_mlp: unknown init 'mup'; init must be one of"):
        with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=2, init="mup")
