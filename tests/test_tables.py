"""The tables everything else reads: dtypes (:mod:`phantom_plugin.dtypes`), the shape rules
(:mod:`phantom_plugin.shapes`), the device figures (:mod:`phantom_plugin.modeling.devices`) and the
extras of ``setup.py``. Arithmetic and argument parsing only: no ranks."""
import os
import re
import subprocess
import sys

import pytest
import torch

from phantom_plugin import dtypes, shapes
from phantom_plugin.bench.workload import RunSpec
from phantom_plugin.cli import bench as bench_cli
from phantom_plugin.modeling import datasheet, devices, energy_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dtype_table_names_sizes_and_torch_dtypes_agree():
    assert list(dtypes.DTYPES) == ["fp32", "bf16", "fp16", "fp64"]
    for name, d in dtypes.DTYPES.items():
        t = dtypes.torch_dtype(name)
        assert t is getattr(torch, d.torch_name) and t.itemsize == d.bytes
        assert dtypes.of_torch(t) is d and dtypes.lookup(d.torch_name) is d and dtypes.lookup(str(t)) is d
    assert len({d.code for d in dtypes.DTYPES.values()}) == len(dtypes.DTYPES)
    assert dtypes.of_torch(torch.int8) is None and dtypes.of_torch("float32") is None
    with pytest.raises(ValueError, match=r"--dtype: unknown dtype 'int8'; use one of fp32, bf16, fp16, fp64, float32"):
        dtypes.lookup("int8", "--dtype")


def test_shape_rules_name_the_argument_and_the_fix():
    assert shapes.divisibility_error("in_features", 12, 4) is None
    assert shapes.divisibility_error("in_features", 9, 2) == (
        "in_features=9 is not divisible by the group size 2; choose a multiple of 2 or a group size that divides 9")
    assert shapes.ghost_dim_error(4, 8, 2) is None and shapes.ghost_dim_error(99, 8, 1) is None
    assert shapes.ghost_dim_error(True, 8, 2) == "ghost_dim must be an integer >= 1, got True"
    msg = shapes.ghost_dim_error(7, 12, 2, name="ghost_neurons", bound="in_features/size", where="largest: 'fc2'")
    assert msg.startswith("ghost_neurons=7 exceeds in_features/size (largest: 'fc2', 12/2 = 6); lower ghost_neurons")


def test_one_device_table_feeds_the_datasheet_and_the_modeled_energy():
    h100 = devices.DEVICES["h100-sxm"]
    ext = datasheet.extrapolate(1024, 2, 2, 8, 64, "bfloat16", "h100-sxm")["extrapolation"]
    assert ext["matmul_flops_per_s"] == h100.matmul_flops["bf16"] and ext["source"] == h100.source
    assert h100.pj_per_flop == pytest.approx(h100.board_watts / h100.matmul_flops[h100.energy_dtype] * 1e12)
    assert energy_model.modeled_energy_j(1e12, 0.0, "h100-sxm") == pytest.approx(h100.pj_per_flop)
    assert energy_model.describe("h100-sxm").startswith("preset h100-sxm: 0.707 pJ/FLOP (derived: NVIDIA H100")
    for d in devices.DEVICES.values():
        assert d.energy_dtype in d.matmul_flops and d.source and d.byte_source and d.flop_source
    with pytest.raises(ValueError, match="modeled_energy_j: dev: unknown device 'h100-sxm-bf16'; choose one of "
                                         "a100-sxm, h100-sxm, h200-sxm"):
        energy_model.modeled_energy_j(1.0, 1.0, "h100-sxm-bf16")


def test_energy_preset_takes_device_keys_and_names_the_flag(capsys):
    assert bench_cli.parse_args([]).energy_preset == RunSpec.energy_preset == "h100-sxm"
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--energy-preset", "h100-sxm-bf16"])
    err = capsys.readouterr().err
    assert "--energy-preset" in err and "'a100-sxm', 'h100-sxm', 'h200-sxm'" in err
    with pytest.raises(ValueError, match=r"RunSpec.energy_preset must be one of a100-sxm, h100-sxm, h200-sxm .*'b200'"):
        RunSpec(mode="tp", width=8, depth=1, ghost_dim=1, batch=1, steps=9, energy_preset="b200")


def test_phantom_plan_runs_without_torch():
    """The counts, the datasheet extrapolation and the tables import no torch."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from phantom_plugin.cli import plan\n"
            "from phantom_plugin.modeling import energy_model\n"
            "energy_model.modeled_energy_j(1.0, 1.0)\n"
            "sys.exit(plan.main(['--width', '64', '--depth', '2', '--ranks', '2', '--ghosts', '4', '--dtype', 'bf16',"
            " '--datasheet', 'a100-sxm', '--json']))\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr


def test_extras_cover_what_each_tool_imports(monkeypatch):
    import runpy

    import setuptools
    got = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"))
    extras = {k: {re.split(r"[<>=~!\[ ;]", r)[0] for r in v} for k, v in got["extras_require"].items()}
    assert {"megatron-core", "psutil"} <= extras["megatron"]       # the adapter; psutil: megatron's checkpoint saver
    assert {"deepspeed", "pydantic"} <= extras["deepspeed"]
    assert {"deepspeed", "transformers", "accelerate"} <= extras["hf"]
    assert {"megatron-core", "matplotlib"} <= extras["bench"]      # phantom-bench's TP baseline and plots
    assert extras["energy"] == {"nvidia-ml-py"}
    assert {"pytest", "ruff", "matplotlib", "transformers", "accelerate"} <= extras["test"]
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= extras["docs"]      # `make docs`
    assert [r for r in got["install_requires"] if r.startswith("torch")] == ["torch>=2.4"]
    assert not any(r.startswith("torch") for reqs in got["extras_require"].values() for r in reqs)
