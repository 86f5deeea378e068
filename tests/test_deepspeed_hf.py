"""Hugging Face ``Trainer`` under the real ``deepspeed`` launcher, phantom MLPs from the config alone.

Launches of this file, on CPU, as a stock ``Trainer`` script (the example's model, data and
arguments; ``ds_configs/hf_phantom_zero2.json``: ZeRO-2, ``"auto"`` values) that does not import
the plugin: the import hook installed with the package does the rest. ``deepspeed --num_gpus 2``
(one phantom group) with HF's own AdamW (decay / no-decay groups), and ``--num_gpus 4`` (phantom
2 x data 2) with an ``"optimizer"`` section (Trainer passes a ``DummyOptim``'s parameters). The
ranks record, and the tests check:

* the plugin was not imported by the script, yet the Llama's MLPs became phantom ones;
* step-0 logits equal the dense model's (``ghost_neurons = width/size``: exact; fp32 rounding);
* every forward of the ranks of a phantom group saw the same batch, the data ranks different
  ones (Accelerate shards by data-parallel rank: its loader holds 1/dp of the data set), and the
  batches change from step to step;
* ``train_batch_size`` = micro x accumulation x data-parallel size; the loss falls;
* each phantom weight trained, in its dense weight's optimizer group (weight decay; norms in
  the no-decay group) when HF builds the optimizer; with an ``"optimizer"`` section the adapter's
  phantom-aware groups (``lr_multipliers`` ``"auto"``), HF's scheduler keeping their lr ratios;
  a second ``deepspeed.initialize`` of the trained model converts nothing;
* ``to_dense`` + ``save_pretrained`` (rank 0) + ``from_pretrained`` (every rank) give
  ``nn.Linear`` MLPs whose logits equal the trained phantom model's, config untouched.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow       # every test here launches ranks (about a minute a launch)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "ds_configs/hf_phantom_zero2.json"
CONFIG3 = ROOT / "ds_configs/hf_phantom_zero3.json"

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


# ============================== launcher side (pytest) ======================================

def _run(tmp_path, n: int, extra: list[str]) -> list[dict]:
    from test_deepspeed_launcher import launch_results
    return launch_results(n, Path(__file__), tmp_path, extra, timeout=600)


def _common_checks(r: dict, dp: int, reinit: bool = True) -> None:
    assert r["plugin_imported_by_script"] is False
    assert r["mlp_types"] == ["PhantomEdgeLinear"], r["mlp_types"]
    assert r["converted"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert r["step0_err"] < 1e-5, r["step0_err"]
    assert r["loader_len"] == r["dataset_len"] // (r["batch"] * dp)     # split over data ranks only
    assert r["train_batch_size"] == r["batch"] * dp and r["dp"] == dp
    assert r["losses"][-1] < r["losses"][0]
    assert len(set(r["batches"])) > 1
    assert r["trained_all"] is True
    assert not reinit or r["reinit_same_layers"] is True
    assert r["export_types"] == ["Linear"]
    assert r["export_err"] < 1e-5 and r["reload_err"] < 1e-5, (r["export_err"], r["reload_err"])
    assert r["config_diff"] == {}, r["config_diff"]


def test_stock_trainer_trains_phantom_llama_and_exports_dense(tmp_path):
    """2 ranks = one phantom group; HF's AdamW built before initialize, remapped group by group."""
    res = _run(tmp_path, 2, [])
    for r in res:
        _common_checks(r, dp=1)
        assert r["decay_of"]["compressor"] == r["decay_of"]["local_weight"] == r["decay_of"]["decompressor"] == [0.01]
        assert r["decay_of"]["norm"] == [0.0]
        assert all(kind is None for kind, _, _ in r["groups"])     # HF's own groups, kept as given
    assert res[0]["batches"] == res[1]["batches"] and len(res[0]["batches"]) >= 6


def test_trainer_phantom_2_x_data_2_with_config_optimizer(tmp_path):
    """4 ranks, phantom 2 x data 2; an "optimizer" section ("auto" values): Trainer passes a
    DummyOptim's parameters, remapped. Phantom ranks share batches, data ranks differ."""
    res = _run(tmp_path, 4, ["--optimizer_section"])
    for r in res:
        _common_checks(r, dp=2)
        # "lr_multipliers" "auto": phantom-aware groups (the factors at lr x 0.5: k = in/size), the
        # config's weight decay on every group, and HF's scheduler keeps each group's lr ratio
        assert r["decay_of"]["compressor"] == r["decay_of"]["norm"] == [0.01]
        assert sorted({k for k, _, _ in r["groups"]}) == ["bias", "compressor", "decompressor", "local", "other"]
        for kind, mult, initial_lr in r["groups"]:
            assert mult == (0.5 if kind in ("compressor", "decompressor") else 1.0), (kind, mult)
            assert abs(initial_lr - 3e-3 * mult) < 1e-12, (kind, mult, initial_lr)
    b = [r["batches"] for r in res]
    assert b[0] == b[1] and b[2] == b[3] and b[0] != b[2]


def test_trainer_zero3_from_pretrained_trains_and_exports_dense(tmp_path):
    """ZeRO-3 (``ds_configs/hf_phantom_zero3.json``), the Llama loaded with ``from_pretrained``
    after ``TrainingArguments`` -- so inside ``zero.Init`` over the whole world -- converted from
    its gathered weights (exact at step 0), trained, exported (partitions gathered) exactly."""
    res = _run(tmp_path, 2, ["--zero3"])
    for r in res:
        assert r["zero_init"] is True
        _common_checks(r, dp=1, reinit=False)
        assert r["stage"] == 3
    assert res[0]["batches"] == res[1]["batches"]


# ============================== rank side (under the launcher) ==============================

def _logits(model, ids):
    import torch
    was = model.training
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
    model.train(was)
    return y


def _local(p):
    """This rank's values of ``p`` (its ZeRO-3 partition when partitioned)."""
    return getattr(p, "ds_tensor", p).detach()


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--optimizer_section", action="store_true")
    ap.add_argument("--zero3", action="store_true")
    cli = ap.parse_args()
    # the site hook itself loads these at start (phantom_plugin's own import is lazy): anything more
    # would mean the script imported the plugin
    hook = {"phantom_plugin", "phantom_plugin.integrations", "phantom_plugin.integrations.deepspeed_autoload"}
    out: dict = {"plugin_imported_by_script": any((m == "phantom_plugin" or m.startswith("phantom_plugin."))
                                                  and m not in hook for m in sys.modules)}
    sys.path.insert(0, str(ROOT / "examples"))
    import torch
    import torch.distributed as dist
    import deepspeed
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback
    import hf_trainer_phantom as ex
    torch.set_num_threads(1)
    tmp = Path(cli.out)
    config = str(CONFIG3 if cli.zero3 else CONFIG)
    if cli.optimizer_section:           # Trainer then builds a DummyOptim; "auto" filled by HF
        ds = json.loads(CONFIG.read_text())
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto", "torch_adam": True}}
        ds["phantom_parallel"]["lr_multipliers"] = "auto"      # spelled out: not Accelerate's to fill
        config = str(tmp / f"ds_{os.environ['RANK']}.json")
        Path(config).write_text(json.dumps(ds))
    args = argparse.Namespace(deepspeed=config, steps=6, batch=4, lr=3e-3, log_every=1,
                              output_dir=str(tmp / "out"))
    model = ex.build_model()
    dense = copy.deepcopy(model)
    if cli.zero3:
        model.save_pretrained(tmp / f"init{os.environ['RANK']}")
    targs = ex.training_args(args)      # under ZeRO-3 from here on from_pretrained uses zero.Init
    if cli.zero3:
        model = LlamaForCausalLM.from_pretrained(tmp / f"init{os.environ['RANK']}")
        out["zero_init"] = all(hasattr(p, "ds_id") for p in model.parameters())
    probe = ex.Progressions(3, seed=99).ids
    dense_logits = _logits(dense, probe)
    batches: list = []
    model.register_forward_pre_hook(
        lambda m, a, kw: batches.append(int((kw["input_ids"] * torch.arange(kw["input_ids"].numel()).view_as(
            kw["input_ids"])).sum())) if m.training else None, with_kwargs=True)
    start: dict = {}

    class Record(TrainerCallback):
        def on_train_begin(self, targs, state, control, model=None, **kw):
            out["mlp_types"] = sorted({type(m).__name__ for n, m in model.named_modules()
                                       if n.endswith(("mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"))})
            y = _logits(model, probe)
            out["step0_err"] = float((y - dense_logits).abs().max() / dense_logits.abs().max())
            start.update({n: _local(p).clone() for n, p in model.named_parameters()})

    dataset = ex.Progressions(256)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[Record()])
    trainer.train()
    engine = trainer.model_wrapped
    out["converted"] = [c.name for c in engine.phantom.conversions]
    out["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out["batches"] = batches
    out["dataset_len"], out["batch"] = len(dataset), args.batch
    out["loader_len"] = len(trainer.get_train_dataloader())
    out["train_batch_size"], out["dp"] = engine.train_batch_size(), engine.dp_world_size
    names = {id(p): n for n, p in model.named_parameters()}
    decay_of: dict = {}
    out["stage"] = engine.zero_optimization_stage()
    bit16 = getattr(engine.optimizer, "bit16_groups", None) or engine.optimizer.fp16_groups
    for params, group in zip(bit16, engine.optimizer.optimizer.param_groups):
        for p in params:
            kind = names[id(p)].rsplit(".", 1)[-1] if ".mlp." in names[id(p)] else (
                "norm" if "norm" in names[id(p)] else "other")
            decay_of.setdefault(kind, set()).add(group["weight_decay"])
    out["decay_of"] = {k: sorted(v) for k, v in decay_of.items()}
    out["groups"] = [[g.get("kind"), g.get("lr_mult"), g.get("initial_lr")]
                     for g in engine.optimizer.optimizer.param_groups]
    out["trained_all"] = all(not torch.equal(_local(p), start[n]) for n, p in model.named_parameters()
                             if ".mlp." in n)

    # an evaluation / batch-size retry calls deepspeed.initialize again: nothing is converted twice
    if not cli.zero3:       # (a ZeRO-0 engine over the ZeRO-3 one's partitioned parameters: no)
        layers = [id(m) for m in model.modules()]
        cfg = copy.deepcopy(trainer.accelerator.deepspeed_config)
        cfg["zero_optimization"] = {"stage": 0}
        cfg.pop("optimizer", None)
        engine2, *_ = deepspeed.initialize(model=model, config=cfg)
        out["reinit_same_layers"] = ([id(m) for m in model.modules()] == layers
                                     and engine2.phantom.conversions is engine.phantom.conversions)

    phantom_logits = _logits(model, probe)
    config_before = model.config.to_dict()       # as Trainer left it (it sets use_cache=False)
    from phantom_plugin.deepspeed import to_dense
    exported = to_dense(engine)
    out["export_types"] = sorted({type(m).__name__ for n, m in exported.named_modules()
                                  if n.endswith(("mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"))})
    scale = phantom_logits.abs().max()
    out["export_err"] = float((_logits(exported, probe) - phantom_logits).abs().max() / scale)
    config_after = exported.config.to_dict()
    out["config_diff"] = {k: [str(config_before.get(k)), str(config_after.get(k))]
                          for k in set(config_before) | set(config_after) if config_before.get(k) != config_after.get(k)}
    if dist.get_rank() == 0:
        exported.save_pretrained(tmp / "dense")
    dist.barrier()
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    unset_hf_deepspeed_config()             # a plain (not zero.Init) load to compare with
    back = LlamaForCausalLM.from_pretrained(tmp / "dense")
    out["reload_err"] = float((_logits(back, probe) - phantom_logits).abs().max() / scale)
    out["rank"] = dist.get_rank()
    from dist_utils import finish_rank
    finish_rank(tmp, out)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _main()
