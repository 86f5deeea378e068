"""Region ops at the edges of a phantom block, against single-process references (gloo ranks)."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from phantom_plugin import (CommCounter, gather_from_group, hidden_to_sequence, scatter_to_group,
                            sequence_to_hidden)


def _check_regions(rank, p):
    g = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    s, b, h = 2 * p, 3, 4 * p
    full = torch.randn(s, b, h, dtype=torch.float64, generator=gen)
    weight = torch.randn(s, b, h, dtype=torch.float64, generator=gen)   # d(loss)/d(output) for every op
    hs = slice(rank * h // p, (rank + 1) * h // p)
    ss = slice(rank * s // p, (rank + 1) * s // p)

    x = full.clone().requires_grad_()
    y = scatter_to_group(x, g)                                           # [s, b, h/p]
    torch.testing.assert_close(y, full[..., hs])
    (y * weight[..., hs]).sum().backward()
    # every rank's loss term is sum(own slice * weight): the all-gathered grad is weight everywhere
    torch.testing.assert_close(x.grad, weight)

    x = full[..., hs].clone().requires_grad_()
    y = gather_from_group(x, g)                                          # [s, b, h]
    torch.testing.assert_close(y, full)
    (y * weight).sum().backward()
    torch.testing.assert_close(x.grad, weight[..., hs])

    x = full[ss].clone().requires_grad_()                                # sequence shard
    with CommCounter() as counter:
        y = sequence_to_hidden(x, g)                                     # hidden shard
        torch.testing.assert_close(y, full[..., hs])
        (y * weight[..., hs]).sum().backward()
    torch.testing.assert_close(x.grad, weight[ss])
    assert [r.op for r in counter.records] == ["all_to_all", "all_to_all"]
    assert all(r.sent_bytes == s * b * h * 8 // p // p * (p - 1) for r in counter.records)

    x = full[..., hs].clone().requires_grad_()
    y = hidden_to_sequence(x, g)
    torch.testing.assert_close(y, full[ss])
    (y * weight[ss]).sum().backward()
    torch.testing.assert_close(x.grad, weight[..., hs])
    return True


@pytest.mark.fast
def test_region_ops_p2():
    run_ranks(_check_regions, 2)


def test_region_ops_p3():
    run_ranks(_check_regions, 3)
