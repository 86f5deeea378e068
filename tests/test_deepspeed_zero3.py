"""ZeRO-3 with phantom layers under the real launcher: 4 CPU ranks, phantom 2 x data 2, one launch.

* ZeRO-3 trains the loss trajectory of ZeRO-1 (rtol 1e-4) and of the float64 reference with the
  phantom parametrization, with the same global grad norm (clipping is active);
* a model built under ``deepspeed.zero.Init`` over the whole world (as ``from_pretrained`` does
  under ZeRO-3) is gathered before the SVD: the same losses, and its phantom parameters are
  partitioned over the data-parallel group;
* ``to_dense`` gathers the partitions: a plain model (full parameters, no ZeRO attributes)
  whose outputs equal the trained phantom engine's;
* ``save_checkpoint`` / ``load_checkpoint`` under ZeRO-3 resume bit-identically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow       # every test here launches ranks (about a minute a launch)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_deepspeed_launcher import CLIP, D_IN, _close, _config, _nets, _reference, _train, launch_results  # noqa: E402
from test_deepspeed_checkpoint import _engine, _steps  # noqa: E402


@pytest.fixture(scope="module")
def res(tmp_path_factory) -> list[dict]:
    """The one launch: every rank's results."""
    return launch_results(4, Path(__file__), tmp_path_factory.mktemp("zero3"), timeout=600)


def test_clipping_is_active(res):
    """Precondition of the grad-norm checks: the clipping threshold is below every step's norm."""
    for r in res:
        assert min(r["ref_norms"]) > CLIP, r["ref_norms"]


@pytest.mark.parametrize("key", ["3", "init3"])       # built plainly / under deepspeed.zero.Init
def test_zero3_trains_like_zero1(res, key):
    for r in res:
        assert _close(r["losses"][key], r["losses"]["1"], 1e-4), (r["losses"][key], r["losses"]["1"])


@pytest.mark.parametrize("key", ["3", "init3"])
def test_zero3_trains_like_the_float64_twin(res, key):
    for r in res:
        assert _close(r["losses"][key], r["ref_losses"], 1e-4), (r["losses"][key], r["ref_losses"])


@pytest.mark.parametrize("key", ["3", "init3"])
def test_zero3_reports_the_global_grad_norm(res, key):
    for r in res:
        assert _close(r["norms"][key], r["ref_norms"], 1e-4), (r["norms"][key], r["ref_norms"])


def test_zero_init_model_is_partitioned_before_conversion(res):
    for r in res:
        assert r["partitioned_before"] is True


def test_zero_init_partitions_over_the_data_group(res):
    """After conversion, phantom and dense parameters alike are partitioned over the data-parallel group."""
    for r in res:
        assert r["phantom_partition_ranks"] == [r["data_ranks"]], r["phantom_partition_ranks"]
        assert r["dense_partition_ranks"] == [r["data_ranks"]], r["dense_partition_ranks"]


def test_export_gathers_a_plain_dense_model(res):
    """Full parameters, no ZeRO attributes, no phantom module; its outputs equal the engine's (1e-5)."""
    for r in res:
        assert r["export_plain"] is True
        assert r["export_err"] < 1e-5, r["export_err"]


def test_zero3_resume_is_bit_exact(res):
    for r in res:
        assert r["continued"] == r["resumed"], (r["continued"], r["resumed"])
        assert r["fresh"] != r["continued"]             # not vacuous: the load did something


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    import torch
    import torch.distributed as dist
    import deepspeed
    from phantom_plugin.deepspeed import to_dense
    torch.set_num_threads(1)
    tmp = Path(args.out)
    deepspeed.init_distributed()
    rank = dist.get_rank()
    dp_rank, steps = rank // 2, 4
    Net, _ = _nets()
    out: dict = {"losses": {}, "norms": {}, "data_ranks": [rank % 2, rank % 2 + 2]}
    ref, out["ref_norms"] = _reference(Net(), steps, 2, k=8)
    out["ref_losses"] = [l[dp_rank] for l in ref]

    def cfg(stage):
        c = _config(stage=stage)
        c.pop("comms_logger")
        return c

    for stage in (1, 3):
        _, out["losses"][str(stage)], out["norms"][str(stage)] = _train(Net(), cfg(stage), steps, dp_rank)

    with deepspeed.zero.Init(config_dict_or_path=cfg(3)):          # over the whole world
        model = Net()
    out["partitioned_before"] = all(hasattr(p, "ds_id") for p in model.parameters())
    engine, out["losses"]["init3"], out["norms"]["init3"] = _train(model, cfg(3), steps, dp_rank)
    groups = lambda pred: sorted({tuple(dist.get_process_group_ranks(p.ds_process_group))  # noqa: E731
                                  for n, p in engine.module.named_parameters() if pred(n)})
    out["phantom_partition_ranks"] = [list(g) for g in groups(lambda n: "mlp" in n)]
    out["dense_partition_ranks"] = [list(g) for g in groups(lambda n: "mlp" not in n)]
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(7))
    engine.eval()
    with torch.no_grad():
        y = engine(x)
    model = to_dense(engine)
    out["export_plain"] = (not any(hasattr(p, "ds_id") for p in model.parameters())
                           and all(p.numel() > 0 for p in model.parameters())
                           and not any("Phantom" in type(m).__name__ for m in model.modules()))
    with torch.no_grad():
        out["export_err"] = float((model(x) - y).abs().max() / y.abs().max())

    engine = _engine(cfg(3))
    _steps(engine, range(3), dp_rank)
    engine.save_checkpoint(str(tmp / "z3"))
    out["continued"] = _steps(engine, range(3, 6), dp_rank)
    out["fresh"] = _steps(_engine(cfg(3)), range(3, 6), dp_rank)
    engine = _engine(cfg(3))
    engine.load_checkpoint(str(tmp / "z3"))
    out["resumed"] = _steps(engine, range(3, 6), dp_rank)

    from dist_utils import finish_rank
    finish_rank(tmp, out)


if __name__ == "__main__":
    _main()
