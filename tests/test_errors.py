"""Bad input gives a clear error naming the argument and the fix, on every rank, never a hang."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from phantom_plugin import PhantomFFN, PhantomLinear, comm


_INVALID = [
    (dict(in_features=9, out_features=8, ghost_dim=1), "in_features=9 is not divisible"),
    (dict(in_features=8, out_features=9, ghost_dim=1), "out_features=9 is not divisible"),
    (dict(in_features=8, out_features=8, ghost_dim=0), "ghost_dim must be an integer >= 1"),
    (dict(in_features=8, out_features=8, ghost_dim=5), "ghost_dim=5 exceeds in_features/p = 8/2 = 4"),
]


def _build_each(rank, p):
    """Every case of :data:`_INVALID` on this rank, one after another: what each raised."""
    out = []
    for kwargs, _ in _INVALID:
        try:
            _build(rank, p, dict(kwargs))
            out.append("no error")
        except Exception as e:      # reported to the test, which checks the type
            out.append(f"{type(e).__name__}: {e}")
    return out


@pytest.fixture(scope="module")
def invalid_raised():
    """``[rank][case]``: the error text of each :data:`_INVALID` case, all cases in one launch of 2 ranks."""
    return run_ranks(_build_each, 2, timeout=60)


@pytest.mark.fast
@pytest.mark.parametrize("case", range(len(_INVALID)), ids=[needle for _, needle in _INVALID])
def test_invalid_arguments_raise_on_every_rank(invalid_raised, case):
    needle = _INVALID[case][1]
    for texts in invalid_raised:
        assert texts[case].startswith("ValueError: ") and needle in texts[case], texts[case]


def _build(rank, p, kwargs):
    PhantomLinear(kwargs.pop("in_features"), kwargs.pop("out_features"), group=dist.group.WORLD, **kwargs)


def _disagree(rank, p, field):
    args = dict(in_features=8, out_features=8, ghost_dim=2, seed=0)
    args[field] = {"in_features": 8 + 4 * rank, "out_features": 8 + 2 * rank,
                   "ghost_dim": 1 + rank, "seed": rank}[field]
    PhantomLinear(args.pop("in_features"), args.pop("out_features"), group=dist.group.WORLD, **args)


@pytest.mark.parametrize("field", ["in_features", "out_features", "ghost_dim", "seed"])
def test_ranks_that_disagree_fail_together(field):
    results = run_ranks(_disagree, 2, field, allow_failures=True, timeout=60)
    for status, text in results:
        assert status == "error" and f"ranks disagree on `{field}`" in text, text


def _one_rank_invalid(rank, p):
    PhantomLinear(8, 8, ghost_dim=1 if rank == 0 else 99, group=dist.group.WORLD, seed=0)


def test_one_rank_with_invalid_arguments_does_not_hang_the_others():
    results = run_ranks(_one_rank_invalid, 2, allow_failures=True, timeout=60)
    assert "ghost_dim=99 exceeds" in results[1][1]
    assert "rank(s) [1] of the group rejected their arguments" in results[0][1]


@pytest.mark.fast
def test_group_without_initialized_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        PhantomLinear(8, 8, ghost_dim=2, group=object())
    # group=None without torch.distributed: a plain dense layer
    layer = PhantomLinear(8, 6, ghost_dim=2, seed=0)
    assert layer.group_size == 1 and layer.compressor is None
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ layer.local_weight.t() + layer.bias)


@pytest.mark.fast
def test_wrong_input_width_names_the_expected_shard():
    layer = PhantomLinear(8, 6, ghost_dim=2, seed=0)
    with pytest.raises(ValueError, match="expected in_features/p = 8/1 = 8"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="activation must be one of"):
        PhantomFFN(8, 2, ghost_dim=1, activation="swish")


def _die_mid_step(rank, p):
    with comm.collective_timeout(20):
        ffn = PhantomFFN(32, 4, ghost_dim=2, group=dist.group.WORLD, seed=0)
        x = torch.randn(8, 32)
        ffn(x).sum().backward()          # one good step
        if rank == 1:
            os._exit(3)                  # dies before the next step's first collective
        start = time.monotonic()
        try:
            ffn(x).sum().backward()
        except RuntimeError as e:
            return ("raised", time.monotonic() - start, str(e)[:200])
        return ("no error", time.monotonic() - start, "")


def test_killed_rank_makes_the_others_fail_instead_of_hanging():
    results = run_ranks(_die_mid_step, 2, allow_failures=True, timeout=90, pg_timeout_s=30)
    assert results[1][0] == "died"
    status, value = results[0]
    assert status == "ok", value
    outcome, seconds, message = value
    assert outcome == "raised" and seconds < 60, value
