"""The ``phantom_parallel`` section: every bad value is an error naming the field, raised before
any process group exists (checked: ``torch.distributed`` stays uninitialized), and a bad config
under the real launcher ends every rank quickly instead of hanging."""
from __future__ import annotations

import json
import re
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("deepspeed")

from phantom_plugin.deepspeed import PhantomConfigError, initialize, load_section  # noqa: E402
from phantom_plugin.deepspeed.config import check_run  # noqa: E402

GOOD = {"enabled": True, "size": 2, "ghost_neurons": 4, "target_modules": ["mlp"]}


def _ds(**section):
    return {"train_micro_batch_size_per_gpu": 2, "phantom_parallel": {**GOOD, **section}}


def test_good_section_and_defaults():
    cfg = load_section(_ds())
    assert (cfg.size, cfg.ghost_neurons, cfg.target_modules) == (2, 4, ["mlp"])
    assert cfg.init_from_dense is True and cfg.comm_dtype is None and cfg.log_interval == 0
    assert load_section({"train_batch_size": 8}) is None
    assert load_section({"phantom_parallel": {"enabled": False}}).enabled is False


@pytest.mark.parametrize("field, value, text", [
    ("size", 0, "greater than or equal to 1"),
    ("size", "2", "valid integer"),
    ("size", "auto", "valid integer"),
    ("size", 1.5, "valid integer"),
    ("ghost_neurons", 0, "greater than or equal to 1"),
    ("ghost_neurons", True, "valid integer"),
    ("target_modules", "mlp", "valid list"),
    ("target_modules", ["mlp("], "not a valid regular expression"),
    ("enabled", "true", "valid boolean"),
    ("init_from_dense", 1, "valid boolean"),
    ("comm_dtype", "int8", "'fp32', 'bf16' or 'fp16'"),
    ("log_interval", -1, "greater than or equal to 0"),
    ("seed", None, "valid integer"),
])
def test_bad_value_names_field_and_fix(field, value, text):
    with pytest.raises(PhantomConfigError) as e:
        load_section(_ds(**{field: value}))
    msg = str(e.value)
    line = next(ln for ln in msg.splitlines() if ln.startswith(f"phantom_parallel.{field}"))
    assert text in line and "; use " in line, line


def test_unknown_key_and_missing_required():
    with pytest.raises(PhantomConfigError, match=r"phantom_parallel\.ghost_neuron: Extra inputs are not "
                                                 r"permitted .*remove it; allowed keys: enabled, size"):
        load_section({"phantom_parallel": {"enabled": True, "ghost_neuron": 4, "target_modules": ["x"]}})
    with pytest.raises(PhantomConfigError) as e:
        load_section({"phantom_parallel": {"enabled": True}})
    assert "phantom_parallel.ghost_neurons: required when enabled" in str(e.value)
    assert "phantom_parallel.target_modules: required when enabled" in str(e.value)
    with pytest.raises(PhantomConfigError, match="must be a JSON object"):
        load_section({"phantom_parallel": [1]})


@pytest.mark.parametrize("ds, world, pipeline, text", [
    (_ds(size=4), 6, False, "phantom_parallel.size: size=4 does not divide the 6 ranks"),
    ({**_ds(), "tensor_parallel": {"autotp_size": 4}}, 4, False, "tensor_parallel.autotp_size: 4 differs"),
    ({**_ds(), "tensor_parallel": {"autotp_size": 2}}, 4, False, "tensor_parallel.partition_config"),
    ({**_ds(), "zero_optimization": {"stage": 4}}, 4, False, "zero_optimization.stage: 4 is not a ZeRO stage"),
    ({**_ds(), "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, 4, False,
     "zero_optimization.offload_param: {'device': 'cpu'} is not supported"),
    ({**_ds(), "zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, 4, False,
     "zero_optimization.zero_quantized_weights: True is not supported"),
    ({**_ds(), "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, 4, False,
     "zero_optimization.zero_hpz_partition_size: 2"),
    ({**_ds(), "zero_optimization": {"stage": 3, "mics_shard_size": 2}}, 4, False,
     "zero_optimization.mics_shard_size: 2"),
    ({**_ds(), "zero_optimization": {"stage": 3}}, 4, True, "zero_optimization.stage: 3 with a PipelineModule"),
    ({**_ds(), "pipeline": {"pipe_partitioned": True}}, 4, True, "pipeline.pipe_partitioned: true"),
    ({**_ds(), "pipeline": {"grad_partitioned": True}}, 4, True, "pipeline.grad_partitioned: true"),
    (_ds(), 4, True, "pipeline stages x size = 4 x 2"),
])
def test_run_checks(ds, world, pipeline, text):
    with pytest.raises(PhantomConfigError, match=re.escape(text)):
        check_run(load_section(ds), ds, world, pipeline=pipeline, pipe_stages=4 if "stages" in text else 1)


@pytest.mark.parametrize("zero", [{"stage": 3}, {"stage": 3, "offload_param": {"device": "none"}},
                                  {"stage": 3, "offload_optimizer": {"device": "cpu"}, "mics_shard_size": -1}])
def test_zero3_accepted(zero):
    ds = {**_ds(), "zero_optimization": zero}
    check_run(load_section(ds), ds, 4, pipeline=False)


def _mlp():
    return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))


def test_initialize_fails_before_any_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_ds()))
    args = type("Args", (), {"deepspeed_config": str(path), "local_rank": 0})()
    with pytest.raises(PhantomConfigError, match="size=2 does not divide the 3 ranks"):
        initialize(args=args, model=_mlp())
    with pytest.raises(PhantomConfigError, match="phantom_parallel.size"):
        initialize(model=_mlp(), config=_ds(size=-1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    m = _mlp()
    stepped = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 8)).sum().backward()
    stepped.step()
    with pytest.raises(PhantomConfigError, match="optimizer passed in already has state"):
        initialize(model=m, config=_ds(), optimizer=stepped)
    with pytest.raises(PhantomConfigError, match=r'matches no module of Sequential.*\["mlp"\] for Llama'):
        initialize(model=m, config=_ds(target_modules=["attention"]))
    with pytest.raises(PhantomConfigError, match=r"target_modules: module 'norm' \(LayerNorm\).*"
                                                 r"cannot be converted.*Narrow the pattern"):
        initialize(model=nn.ModuleDict({"norm": nn.LayerNorm(8)}), config=_ds(target_modules=["norm"]))
    with pytest.raises(PhantomConfigError, match=r"ghost_neurons=5 exceeds in_features/size of every converted layer .* 8/2 = 4"):
        initialize(model=m, config=_ds(target_modules=["^$"], ghost_neurons=5))
    with pytest.raises(PhantomConfigError, match="mpu must be None"):
        initialize(model=m, config=_ds(), mpu=object())
    with pytest.raises(ValueError, match="both in args.deepspeed_config and as config="):
        initialize(args=args, model=m, config=_ds())
    assert not dist.is_initialized()
    assert isinstance(m[0], nn.Linear)         # nothing converted


def test_bad_config_under_launcher_exits_fast(tmp_path):
    from test_deepspeed_launcher import ROOT, launch
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads((ROOT / "ds_configs/phantom_ffn.json").read_text()),
                               "phantom_parallel": {"enabled": True, "size": 2, "ghost_neuron": 32,
                                                    "target_modules": ["mlp"]}}))
    t0 = time.time()
    out = launch(2, ROOT / "examples/train_ffn_deepspeed.py",
                 ["--steps", "2", "--deepspeed", "--deepspeed_config", str(bad)], expect_fail=True, timeout=240)
    assert "phantom_parallel.ghost_neuron: Extra inputs are not permitted" in out, out[-3000:]
    assert time.time() - t0 < 200


def test_model_parameters_built_before_conversion_are_remapped():
    """A list, param groups or an optimizer taken from the dense model must name the phantom
    parameters, each new weight in its old weight's group and each new bias in its old bias's."""
    from phantom_plugin.convert import convert_modules
    from phantom_plugin.deepspeed.remap import remap_optimizer, remap_parameters
    model = nn.Sequential(nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)))
    before = {id(p): n for n, p in model.named_parameters()}
    flat = list(model.parameters())
    groups = [{"params": [model[0].weight, model[1][0].weight, model[1][2].weight], "lr": 0.1},
              {"params": [model[1][2].bias, model[0].bias, model[1][0].bias], "lr": 0.2, "weight_decay": 0}]
    opt = torch.optim.AdamW([{**g, "params": list(g["params"])} for g in groups])
    convert_modules(model, [r"^1$"], ghost_dim=1)
    now = list(model.parameters())
    fc1, fc2 = model[1][0].phantom, model[1][2].phantom
    assert [id(p) for p in remap_parameters(flat, model, before)] == [id(p) for p in now]
    g0, g1 = remap_parameters(groups, model, before)
    want0 = [model[0].weight, fc1.local_weight, fc2.local_weight]          # p = 1: no C, D
    want1 = [fc2.bias, model[0].bias, fc1.bias]
    assert g0["lr"] == 0.1 and [id(p) for p in g0["params"]] == [id(p) for p in want0]
    assert g1["weight_decay"] == 0 and [id(p) for p in g1["params"]] == [id(p) for p in want1]
    assert remap_parameters(None, model, before) is None
    remap_optimizer(opt, model, before)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in want0],
                                                                        [id(p) for p in want1]]
