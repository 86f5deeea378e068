"""The demo's TP baseline (megatron-core ColumnParallelLinear/RowParallelLinear) against a
single-process float64 dense model with the same weights, and its bytes against the cost model."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from phantom_plugin import CommCounter, comm, init
from phantom_plugin.modeling import counts

pytest.importorskip("megatron.core")


def _check_tp(rank, p, depth):
    from phantom_plugin.bench.tp_baseline import MegatronTPFFN
    width, batch = 8, 6
    model = MegatronTPFFN(width, depth, group=dist.group.WORLD, seed=4, dtype=torch.float64)
    # the single-process dense model of the same weights, built from the seed alone
    dense = [(init.dense_master(init.derive_seed(4, l), width, width).double().requires_grad_(),
              init.dense_bias(init.derive_seed(4, l), width, width).double().requires_grad_())
             for l in range(depth)]
    x = torch.randn(batch, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with CommCounter() as counter, comm.intercept_torch_collectives():
        y = model(x)
        y.pow(3).sum().backward()
    h = x
    for l, (w, b) in enumerate(dense):
        h = h @ w.t() + b
        if l < depth - 1:
            h = torch.nn.functional.gelu(h)
    h.pow(3).sum().backward()
    torch.testing.assert_close(y, h, rtol=0, atol=1e-10)
    m = width // p
    for l, (layer, (w, b)) in enumerate(zip(model.layers, dense)):
        if l % 2 == 0:   # column: rows sharded, bias sharded
            wg, bg = w.grad[rank * m:(rank + 1) * m], b.grad[rank * m:(rank + 1) * m]
        else:            # row: columns sharded, bias replicated
            wg, bg = w.grad[:, rank * m:(rank + 1) * m], b.grad
        torch.testing.assert_close(layer.weight.grad, wg, rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, bg, rtol=0, atol=1e-10)
    model_cost = counts.tp_ffn_cost(width, depth, p=p, batch=batch, dtype_bytes=8)
    assert sorted((r.op, r.sent_bytes) for r in counter.records) == \
        sorted((m.op, m.bytes_sent) for m in model_cost.messages)
    return True


@pytest.mark.parametrize("depth", [4, 3])
def test_megatron_tp_baseline_matches_dense_and_the_cost_model(depth):
    run_ranks(_check_tp, 2, depth)
