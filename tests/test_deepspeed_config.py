"""The ``phantom_parallel`` section: every bad value is an error naming the field, raised before
any process group exists (checked: ``torch.distributed`` stays uninitialized). That a bad config
under the real launcher ends every rank quickly is checked in test_deepspeed_launcher.py."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("deepspeed")

from phantom_plugin.deepspeed import PhantomConfigError, initialize, load_section  # noqa: E402
from phantom_plugin.deepspeed.config import check_run  # noqa: E402

pytestmark = pytest.mark.fast

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


def _args(tmp_path, ds: dict):
    """``args`` as a launcher script passes them, with the config in a file."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return type("Args", (), {"deepspeed_config": str(path), "local_rank": 0})()


def _stepped_sgd(m):
    """An optimizer of ``m`` that has already taken a step (momentum state)."""
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 8)).sum().backward()
    opt.step()
    return opt


# (id, WORLD_SIZE, model, initialize's keywords given the model and tmp_path, error, message)
_BAD_INITIALIZE = [
    ("size-does-not-divide-ranks", "3", _mlp, lambda m, tmp: {"args": _args(tmp, _ds())},
     PhantomConfigError, "size=2 does not divide the 3 ranks"),
    ("bad-size", "3", _mlp, lambda m, tmp: {"config": _ds(size=-1)}, PhantomConfigError, "phantom_parallel.size"),
    ("optimizer-with-state", "2", _mlp, lambda m, tmp: {"config": _ds(), "optimizer": _stepped_sgd(m)},
     PhantomConfigError, "optimizer passed in already has state"),
    ("target-matches-nothing", "2", _mlp, lambda m, tmp: {"config": _ds(target_modules=["attention"])},
     PhantomConfigError, r'matches no module of Sequential.*\["mlp"\] for Llama'),
    ("target-not-convertible", "2", lambda: nn.ModuleDict({"norm": nn.LayerNorm(8)}),
     lambda m, tmp: {"config": _ds(target_modules=["norm"])},
     PhantomConfigError, r"target_modules: module 'norm' \(LayerNorm\).*cannot be converted.*Narrow the pattern"),
    ("ghosts-exceed-every-layer", "2", _mlp, lambda m, tmp: {"config": _ds(target_modules=["^$"], ghost_neurons=5)},
     PhantomConfigError, r"ghost_neurons=5 exceeds in_features/size of every converted layer .* 8/2 = 4"),
    ("mpu-given", "2", _mlp, lambda m, tmp: {"config": _ds(), "mpu": object()}, PhantomConfigError, "mpu must be None"),
    ("config-twice", "2", _mlp, lambda m, tmp: {"args": _args(tmp, _ds()), "config": _ds()},
     ValueError, "both in args.deepspeed_config and as config="),
]


@pytest.mark.parametrize("world, model, kwargs, error, text", [c[1:] for c in _BAD_INITIALIZE],
                         ids=[c[0] for c in _BAD_INITIALIZE])
def test_initialize_fails_before_any_process_group(world, model, kwargs, error, text, tmp_path, monkeypatch):
    """Each bad input raises naming the field, with no process group made and nothing converted."""
    monkeypatch.setenv("WORLD_SIZE", world)
    m = model()
    with pytest.raises(error, match=text):
        initialize(model=m, **kwargs(m, tmp_path))
    assert not dist.is_initialized()
    assert all(type(x).__module__.startswith("torch.") for x in m.modules()), m     # nothing converted


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


# ------------------------------ lr_multipliers ----------------------------------------------

@pytest.mark.parametrize("value, want", [("auto", "auto"), (False, "off"), (None, "off"), ("off", "off"),
                                         ({"compressor": 0.5, "other": 2}, {"compressor": 0.5, "other": 2.0})])
def test_lr_multipliers_values(value, want):
    assert load_section(_ds(lr_multipliers=value)).lr_multipliers == want
    assert load_section(_ds()).lr_multipliers == "auto"


@pytest.mark.parametrize("value, text", [
    (True, "must be \"auto\", false/null/\"off\" or a non-empty object"),
    ("on", "must be \"auto\""),
    (1.0, "must be \"auto\""),
    ({}, "non-empty object"),
    ({"compresor": 0.5}, "unknown kind(s) ['compresor']"),
    ({"compressor": 0}, "multiplier of 'compressor' must be a number > 0"),
    ({"compressor": -1.0}, "must be a number > 0"),
    ({"compressor": "0.5"}, "must be a number > 0"),
    ({"compressor": True}, "must be a number > 0"),
    ({"compressor": float("inf")}, "must be a number > 0"),
])
def test_lr_multipliers_bad_values_name_the_field(value, text):
    with pytest.raises(PhantomConfigError) as e:
        load_section(_ds(lr_multipliers=value))
    line = next(ln for ln in str(e.value).splitlines() if ln.startswith("phantom_parallel.lr_multipliers: "))
    assert text in line and "; use \"auto\"" in line and "local, compressor, decompressor, bias, other" in line, line


def _opt_ds(setting="auto", scheduler=None, **opt):
    ds = {**_ds(lr_multipliers=setting),
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, **opt}}}
    if scheduler is not None:
        ds["scheduler"] = scheduler
    return ds


def _plan(ds, **kw):
    from phantom_plugin.deepspeed.lr_groups import plan
    return plan(load_section(ds), ds, **kw)


def test_lr_multipliers_plan_builds_groups_from_an_optimizer_section():
    params = list(_mlp().parameters())
    assert _plan(_opt_ds()).build and _plan(_opt_ds()).base_lr == 1e-3 and _plan(_opt_ds()).multipliers is None
    assert _plan(_opt_ds(), model_parameters=params).build                 # plain parameters: grouped
    assert _plan(_opt_ds({"other": 2.0})).multipliers == {"other": 2.0}


def test_lr_multipliers_plan_off_or_without_optimizer_builds_nothing_silently():
    assert not _plan(_opt_ds(False)).build and _plan(_opt_ds(False)).notice is None
    assert not _plan(_ds()).build and _plan(_ds()).notice is None             # no optimizer at all
    assert _plan(_opt_ds(False), optimizer=torch.optim.AdamW(_mlp().parameters())).notice is None


def _client(kind: str) -> dict:
    """The client's own optimizer or parameter groups, as ``plan``'s keywords."""
    params = list(_mlp().parameters())
    if kind == "optimizer":
        return {"optimizer": torch.optim.AdamW(params)}
    return {"model_parameters": [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]}


@pytest.mark.parametrize("client", ["optimizer", "param-groups"])
def test_lr_multipliers_auto_keeps_the_clients_groups_with_a_notice(client):
    plan_ = _plan(_opt_ds(), **_client(client))
    assert not plan_.build and "\"auto\" not applied" in plan_.notice
    assert "phantom_plugin.param_groups" in plan_.notice and "\"optimizer\" section" in plan_.notice


@pytest.mark.parametrize("client", ["optimizer", "param-groups"])
def test_lr_multipliers_explicit_with_the_clients_groups_raises(client):
    with pytest.raises(PhantomConfigError, match=r"phantom_parallel\.lr_multipliers: \{'compressor': 0\.5\} "
                                                 r"asks for explicit multipliers, but .* was passed"):
        _plan(_opt_ds({"compressor": 0.5}), **_client(client))


@pytest.mark.parametrize("lr", ["auto", None, 0, True])
def test_lr_multipliers_need_a_numeric_base_lr(lr):
    """Without a number > 0 as the optimizer's lr the multipliers have no base: an error naming the
    field and the way out; with ``"lr_multipliers": false`` the same config is fine."""
    ds = _opt_ds()
    ds["optimizer"]["params"]["lr"] = lr
    if lr is None:
        del ds["optimizer"]["params"]["lr"]
    with pytest.raises(PhantomConfigError, match=r"optimizer\.params\.lr: .*needs a number > 0 here.*"
                                                 r"\"lr_multipliers\": false"):
        _plan(ds)
    assert not _plan({**ds, "phantom_parallel": {**ds["phantom_parallel"], "lr_multipliers": False}}).build


@pytest.mark.parametrize("scheduler, ok", [
    ({"type": "WarmupLR", "params": {}}, True), ({"type": "WarmupDecayLR", "params": {"total_num_steps": 9}}, True),
    ({"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}}, True),
    ({"type": "LRRangeTest", "params": {}}, True), ({"type": "WarmupCosineLR", "params": {"total_num_steps": 9}}, True),
    ({"type": "StepLR", "params": {"step_size": 2}}, True),
    ({"type": "CosineAnnealingLR", "params": {"T_max": 9}}, True),
    ({"type": "CosineAnnealingLR", "params": {"T_max": 9, "eta_min": 1e-5}}, False),
    ({"type": "CyclicLR", "params": {"base_lr": 1e-4, "max_lr": 1e-3}}, False),
])
def test_lr_multipliers_refuse_a_scheduler_that_would_erase_them(scheduler, ok):
    from phantom_plugin.deepspeed.lr_groups import plan
    ds = _opt_ds(scheduler=scheduler)
    if ok:
        plan(load_section(ds), ds)
    else:
        with pytest.raises(PhantomConfigError, match=rf"scheduler\.type: '{scheduler['type']}' with "
                                                     r"phantom_parallel\.lr_multipliers active.*set "
                                                     r"\"lr_multipliers\": false"):
            plan(load_section(ds), ds)
    ds = _opt_ds(False, scheduler=scheduler)
    plan(load_section(ds), ds)                                  # off: any scheduler
    plan(load_section(_opt_ds(scheduler=scheduler)), _opt_ds(scheduler=scheduler),
         lr_scheduler=lambda opt: None)                        # a client scheduler: not ours to check


_MULTS = [1.0, 0.25, 0.5]


def _scaled_schedule(scheduler):
    """Rewrite ``scheduler`` for :data:`_MULTS`, build it (DeepSpeed's own class) on three groups
    at lr x mult, step it 3 times: ``(the rewritten parameters, each group's lr)``."""
    from deepspeed.runtime import lr_schedules
    from phantom_plugin.deepspeed.lr_groups import scale_scheduler
    ds = _opt_ds(scheduler=scheduler)
    done = scale_scheduler(ds, _MULTS)
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-3 * m} for m in _MULTS])
    sched = getattr(lr_schedules, ds["scheduler"]["type"])(opt, **ds["scheduler"]["params"])
    for _ in range(3):
        sched.step()
    return done, [g["lr"] for g in opt.param_groups]


# (id, scheduler, the exact set of parameters rewritten or None, values some of them must have)
_SCHEDULES = [
    ("warmup", {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 2e-3, "warmup_num_steps": 10,
                                               "warmup_type": "linear"}},
     {"warmup_min_lr", "warmup_max_lr"}, {"warmup_min_lr": [1e-4 * m for m in _MULTS],
                                          "warmup_max_lr": [2e-3 * m for m in _MULTS]}),
    ("warmup-default-max", {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},     # max: each group's lr
     {"warmup_min_lr"}, {}),
    ("warmup-decay", {"type": "WarmupDecayLR", "params": {"total_num_steps": 20, "warmup_num_steps": 2}},
     None, {"warmup_max_lr": [0.001 * m for m in _MULTS]}),                             # DeepSpeed's default, scaled
    ("one-cycle", {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "decay_lr_rate": 0.1,
                                                  "cycle_first_step_size": 2}},
     {"cycle_min_lr", "cycle_max_lr"}, {}),
    ("lr-range-test", {"type": "LRRangeTest", "params": {"lr_range_test_step_size": 1}},
     {"lr_range_test_min_lr"}, {"lr_range_test_min_lr": [1e-3 * m for m in _MULTS]}),
    ("warmup-cosine", {"type": "WarmupCosineLR", "params": {"total_num_steps": 20, "warmup_num_steps": 2}},
     set(), {}),
]


@pytest.mark.parametrize("scheduler, keys, values", [c[1:] for c in _SCHEDULES], ids=[c[0] for c in _SCHEDULES])
def test_lr_multipliers_scheduler_rewrite_keeps_ratios_in_deepspeed_schedulers(scheduler, keys, values):
    """The rewritten config builds DeepSpeed's own schedulers with each group's lr = scalar x lr_mult
    (defaults of left-out parameters scaled too), at construction and after steps."""
    done, lrs = _scaled_schedule(scheduler)
    if keys is not None:
        assert set(done) == keys, done
    assert {k: done[k] for k in values} == values, done
    assert all(abs(lr / lrs[0] - m) < 1e-12 for lr, m in zip(lrs, _MULTS)), lrs


def test_lr_multipliers_scheduler_ratios_hold_mid_warmup():
    """Not vacuous: after 3 of 10 warm-up steps the lrs are below the maximum, yet in ratio."""
    _, lrs = _scaled_schedule(_SCHEDULES[0][1])
    assert lrs[0] != 2e-3


def test_lr_multipliers_scheduler_list_values_are_the_users_own():
    from phantom_plugin.deepspeed.lr_groups import scale_scheduler
    ds = _opt_ds(scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": [1e-3, 2e-3, 3e-3]}})
    assert scale_scheduler(ds, _MULTS) == {"warmup_min_lr": [0.0] * 3}
    assert ds["scheduler"]["params"]["warmup_max_lr"] == [1e-3, 2e-3, 3e-3]


def test_lr_multipliers_scheduler_all_ones_is_left_alone():
    from phantom_plugin.deepspeed.lr_groups import scale_scheduler
    ds = _opt_ds(scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}})
    assert scale_scheduler(ds, [1.0, 1.0]) == {} and ds["scheduler"]["params"]["warmup_max_lr"] == 1e-3


def test_lr_multipliers_build_keeps_given_trainable_parameters_and_the_configs_other_settings():
    from phantom_plugin.deepspeed.lr_groups import GroupPlan, build
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    gp = GroupPlan(build=True, base_lr=1e-2, multipliers={"other": 3.0})
    groups = build(model, None, gp)
    assert [(g["kind"], g["lr_mult"], g["lr"]) for g in groups] == [("bias", 1.0, 1e-2), ("other", 3.0, 3e-2)]
    assert all(set(g) == {"params", "lr", "kind", "lr_mult"} for g in groups)     # weight decay: the config's
    assert sum(len(g["params"]) for g in groups) == 5                              # frozen weight left out
    assert [p for g in build(model, [model[0].weight], gp) for p in g["params"]] == [model[0].weight]
    with pytest.raises(ValueError, match="not parameters of the model"):
        build(model, [nn.Parameter(torch.zeros(1))], gp)


def test_lr_multipliers_errors_come_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    m = _mlp()
    with pytest.raises(PhantomConfigError, match="lr_multipliers: \\{'compressor': 0.5\\} asks for explicit"):
        initialize(model=m, config=_ds(lr_multipliers={"compressor": 0.5}), optimizer=torch.optim.AdamW(m.parameters()))
    with pytest.raises(PhantomConfigError, match="scheduler.type: 'CyclicLR'"):
        initialize(model=m, config=_opt_ds(scheduler={"type": "CyclicLR", "params": {}}),
                   model_parameters=m.parameters())
    assert not dist.is_initialized() and isinstance(m[0], nn.Linear)


def test_explicit_auto_multipliers_are_dropped_before_accelerate_sees_them():
    from phantom_plugin.deepspeed.hf import keep_section_autos
    ds = _ds(lr_multipliers="auto")
    keep_section_autos(ds)
    assert "lr_multipliers" not in ds["phantom_parallel"] and load_section(ds).lr_multipliers == "auto"
    ds = _ds(lr_multipliers={"other": 2.0})
    keep_section_autos(ds)
    assert ds["phantom_parallel"]["lr_multipliers"] == {"other": 2.0}
