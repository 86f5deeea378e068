"""``engine.save_checkpoint`` / ``load_checkpoint`` with phantom layers, under the real launcher.

One launch of 4 CPU ranks (phantom 2 x data 2) runs every case, engines one after another:

* ZeRO 0, 1, 2: train 3 steps, save, train 3 more; a fresh engine (fresh model) loads the
  checkpoint and trains the same 3 steps: the losses are bit-identical;
* a pipeline (pipe 2 x model 2): the same, with ``train_batch``;
* a checkpoint loaded at another ``ghost_neurons`` or another phantom size raises an error that
  names both layouts and ``to_dense``, and the model is untouched.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow       # every test here launches ranks (about a minute a launch)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_deepspeed_launcher import WIDTH, _batch, _config, _nets, launch_results  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[dict], Path]:
    """The one launch: every rank's results and the checkpoint folder."""
    tmp = tmp_path_factory.mktemp("checkpoint")
    return launch_results(4, Path(__file__), tmp, timeout=600), tmp


@pytest.mark.parametrize("stage", ["0", "1", "2", "pipe"])
def test_resume_is_bit_exact(run, stage):
    for r in run[0]:
        cont, resumed = r["continued"][stage], r["resumed"][stage]
        assert cont == resumed, (cont, resumed)


@pytest.mark.parametrize("stage", ["0", "1", "2", "pipe"])
def test_load_changes_a_fresh_engine(run, stage):
    """Not vacuous: without the load, a fresh engine's 3 steps differ."""
    for r in run[0]:
        assert r["fresh"][stage] != r["continued"][stage]


@pytest.mark.parametrize("stage", ["0", "1", "2"])
def test_resumed_groups_keep_their_multipliers(run, stage):
    """Default groups after the load: the factors at half the lr (k = n/p), all warmed up."""
    for r in run[0]:
        lrs = dict((kind, lr) for kind, lr in r["group_lrs"][stage])
        assert abs(lrs["local"] - 1e-2) < 1e-12 and abs(lrs["compressor"] - 5e-3) < 1e-12, lrs


@pytest.mark.parametrize("what, want", [("ghost", ("ghost_neurons=8", "ghost_neurons=3")),
                                        ("size", ("size=2", "size=4"))])
def test_other_layout_is_refused_naming_both_and_the_fix(run, what, want):
    for r in run[0]:
        msg = r["refused"][what]
        assert all(w in msg for w in want), msg
        assert "deepspeed.to_dense(engine)" in msg and "Nothing was loaded" in msg, msg


@pytest.mark.parametrize("what", ["ghost", "size"])
def test_refused_load_leaves_the_model_untouched(run, what):
    for r in run[0]:
        assert r["untouched"][what] is True


def test_checkpoint_records_the_phantom_layout(run):
    assert (run[1] / "z1" / "global_step3" / "phantom_parallel.json").exists()


# ============================== rank side (under the launcher) ==============================

def _steps(engine, steps, dp_rank):
    import torch
    losses = []
    for step in steps:
        x, y = _batch(step, dp_rank)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def _engine(cfg):
    from phantom_plugin.deepspeed import initialize
    Net, _ = _nets()
    model = Net()
    return initialize(model=model, config=cfg, model_parameters=model.parameters())[0]


def _refused(cfg, where) -> tuple[str, bool]:
    import torch
    engine = _engine(cfg)
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    try:
        engine.load_checkpoint(where)
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    after = engine.module.state_dict()
    return msg, all(torch.equal(before[k], after[k]) for k in before)


def _pipe_engine(cfg, dense):
    import torch
    from deepspeed.pipe import PipelineModule
    from phantom_plugin.deepspeed import initialize, phantom_topology
    model = PipelineModule(layers=copy.deepcopy(dense), topology=phantom_topology(cfg, num_stages=2),
                           partition_method="uniform", loss_fn=torch.nn.functional.mse_loss)
    return initialize(model=model, config=cfg, model_parameters=model.parameters())[0]


def _pipe_steps(engine, steps, gas):
    return [float(engine.train_batch(data_iter=iter([_batch(s, j) for j in range(gas)]))) for s in steps]


def _users_config(stage: int) -> dict:
    """What users get by default: ``lr_multipliers`` "auto" (five optimizer groups, factors at lr x
    0.5 here) and a ``WarmupLR`` whose per-group lrs the adapter scales; the warm-up ends between the
    save (step 3) and the last step, so a resumed scheduler at the wrong step changes the losses."""
    cfg = _config(stage=stage)
    cfg.pop("comms_logger")
    del cfg["phantom_parallel"]["lr_multipliers"]
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                       "warmup_num_steps": 4, "warmup_type": "linear"}}
    return cfg


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    import torch
    import torch.distributed as dist
    import deepspeed
    torch.set_num_threads(1)
    tmp = Path(args.out)
    deepspeed.init_distributed()
    dp_rank = dist.get_rank() // 2
    out: dict = {"continued": {}, "resumed": {}, "fresh": {}, "refused": {}, "untouched": {}, "group_lrs": {}}
    for stage in (0, 1, 2):
        cfg = _users_config(stage)
        engine = _engine(cfg)
        _steps(engine, range(3), dp_rank)
        engine.save_checkpoint(str(tmp / f"z{stage}"))
        out["continued"][str(stage)] = _steps(engine, range(3, 6), dp_rank)
        out["fresh"][str(stage)] = _steps(_engine(cfg), range(3, 6), dp_rank)
        engine = _engine(cfg)
        engine.load_checkpoint(str(tmp / f"z{stage}"))
        out["resumed"][str(stage)] = _steps(engine, range(3, 6), dp_rank)
        out["group_lrs"][str(stage)] = sorted({(g.get("kind"), g["lr"]) for g in engine.optimizer.param_groups})

    cfg = _config(stage=1)
    cfg.pop("comms_logger")
    out["refused"]["ghost"], out["untouched"]["ghost"] = _refused(
        _config(stage=1, ghost_neurons=3), str(tmp / "z1"))
    out["refused"]["size"], out["untouched"]["size"] = _refused(
        _config(stage=1, size=4, ghost_neurons=WIDTH // 4), str(tmp / "z1"))

    gas = 2
    cfg = _config(target_modules=["mlp"])
    cfg.pop("comms_logger")
    cfg["gradient_accumulation_steps"] = gas
    _, layers = _nets()
    dense = layers()
    engine = _pipe_engine(cfg, dense)
    _pipe_steps(engine, range(2), gas)
    engine.save_checkpoint(str(tmp / "pipe"))
    out["continued"]["pipe"] = _pipe_steps(engine, range(2, 4), gas)
    out["fresh"]["pipe"] = _pipe_steps(_pipe_engine(cfg, dense), range(2, 4), gas)
    engine = _pipe_engine(cfg, dense)
    engine.load_checkpoint(str(tmp / "pipe"))
    out["resumed"]["pipe"] = _pipe_steps(engine, range(2, 4), gas)

    out["rank"] = dist.get_rank()
    from dist_utils import finish_rank
    finish_rank(tmp, out)


if __name__ == "__main__":
    _main()
