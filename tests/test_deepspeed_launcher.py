"""The DeepSpeed adapter under the real ``deepspeed`` launcher (CPU accelerator, gloo).

Each test starts ``deepspeed --num_gpus N`` on this file; the ranks run one ``--case`` (the code
under ``if __name__ == "__main__"``), write ``rank<r>.json`` and the test reads them. Several
engines are built one after another inside one launch, because starting ranks costs more than
the checks. References: the same dense model (same initial weights, same batches, AdamW, the same
gradient clipping) trained in float64 in each rank's own process. With
``ghost_neurons = width/size`` every phantom layer is exact, so the fp32 DeepSpeed losses agree
with it to float32 rounding over a few steps (rtol 1e-4); the clipping threshold is below the
gradient norm, so a wrong global grad norm changes every update and fails the comparison.

The first launch on a machine JIT-builds DeepSpeed's shared-memory op (~60 s, cached in
~/.cache/torch_extensions): the timeouts allow for it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow       # every test here launches ranks (about a minute a launch)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
D_IN, WIDTH, D_OUT, MICRO, LR, CLIP = 8, 16, 4, 4, 1e-2, 0.05
K_MULT, LR_MIN, WARM, DECAY = 3, 1e-3, 4, 0.1      # the lr_multipliers case: k < WIDTH/2, WarmupLR, AdamW decay


# ============================== launcher side (pytest) ======================================

def launch(n: int, script: Path, args: list[str], timeout: float = 420, expect_fail: bool = False) -> str:
    """Run ``deepspeed --num_gpus n script args`` on CPU; return its output.

    Fails when the exit code is not what ``expect_fail`` says, or after ``timeout`` seconds
    (the launcher's process group is killed).
    """
    sys.path.insert(0, str(HERE))
    from dist_utils import free_port
    runner = Path(sys.executable).parent / "deepspeed"
    cmd = ([str(runner)] if runner.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"])
    cmd += ["--num_gpus", str(n), "--master_port", str(free_port()), str(script), *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PHANTOM_PLUGIN_AUTOLOAD="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"launcher timed out after {timeout} s:\n{out[-6000:]}") from e
    assert (proc.returncode != 0) == expect_fail, f"launcher exit code {proc.returncode}:\n{out[-8000:]}"
    return out


def launch_results(n: int, script: Path, out_dir: Path, extra: list[str] = (), timeout: float = 420) -> list[dict]:
    """:func:`launch` ``script --out out_dir *extra`` on ``n`` ranks; each rank's ``rank{r}.json``."""
    out = launch(n, script, [*extra, "--out", str(out_dir)], timeout=timeout)
    results = []
    for r in range(n):
        f = out_dir / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no result:\n{out[-6000:]}"
        results.append(json.loads(f.read_text()))
    return results


def run_case(case: str, n: int, tmp_path: Path) -> list[dict]:
    return launch_results(n, Path(__file__), tmp_path, ["--case", case])


def _close(a, b, rtol):
    import numpy as np
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=1e-7)


# One launch per case, shared by the tests of that case (a launch costs about a minute).

@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict]:
    """Case ``two``: size 2 (dp 1); both ranks' results."""
    return run_case("two", 2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def zero(tmp_path_factory) -> list[dict]:
    """Case ``zero``: 4 ranks, phantom size 2 x data 2, ZeRO stages 0, 1, 2."""
    return run_case("zero", 4, tmp_path_factory.mktemp("zero"))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> list[dict]:
    """Case ``pipe``: 4 ranks, pipe 2 x phantom 2."""
    return run_case("pipe", 4, tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def flag(tmp_path_factory) -> list[dict]:
    """Case ``flag``: a plain ``deepspeed.initialize`` script, 2 ranks."""
    return run_case("flag", 2, tmp_path_factory.mktemp("flag"))


@pytest.fixture(scope="module")
def mult(tmp_path_factory) -> list[dict]:
    """Case ``mult``: ``lr_multipliers`` settings, 2 ranks (one phantom group)."""
    return run_case("mult", 2, tmp_path_factory.mktemp("mult"))


def _sizes(log: dict, op: str) -> set[int]:
    """Message sizes (bytes) DeepSpeed's comms logger recorded for ``op``."""
    return {int(s) for s in log.get(op, [])}


# ---- case two: size 2, one data-parallel replica

def test_two_converts_target_modules_and_their_edges(two):
    """``target_modules`` converts both MLPs; their 4 linears become phantom edge layers."""
    for r in two:
        assert r["converted"] == ["blocks.0.mlp", "blocks.1.mlp"]
        assert r["edge_layers"] == 4


def test_two_exact_ghosts_start_at_the_dense_loss(two):
    """With ``ghost_neurons = width/size`` the first loss is the dense model's (rtol 1e-6)."""
    for r in two:
        assert abs(r["exact_losses"][0] - r["dense_loss0"]) < 1e-6 * r["dense_loss0"], (r["exact_losses"][0],
                                                                                         r["dense_loss0"])


def test_two_exact_ghosts_train_like_the_float64_twin(two):
    """Exact phantom training (clipping active) follows the float64 twin to rtol 1e-4 and learns."""
    for r in two:
        assert min(r["ref_norms"]) > CLIP, "clipping must be active for the grad-norm check"
        assert _close(r["exact_losses"], r["ref_losses"], 1e-4), (r["exact_losses"], r["ref_losses"])
        assert r["exact_losses"][-1] < 0.8 * r["exact_losses"][0], r["exact_losses"]


def test_two_k3_trains_like_the_float64_twin(two):
    """``ghost_neurons`` 3 < width/size: the losses of the twin with the same truncated blocks."""
    for r in two:
        assert _close(r["k3_losses"], r["ref_k3_losses"], 1e-4), (r["k3_losses"], r["ref_k3_losses"])


def test_two_counter_records_ghost_sized_gathers(two):
    """The byte counter's forward ghost all-gather holds ``[p, B, k]`` = 2 x 4 x 3 elements."""
    for r in two:
        assert r["counter_ghost_numel"] == 2 * MICRO * 3, r["counter_ghost_numel"]


def test_two_route_is_the_engines_only(two):
    """After ``initialize`` returned, a phantom collective outside the engine's calls goes through
    torch.distributed (counted in fp32), one inside the engine's forward through deepspeed.comm."""
    for r in two:
        calls = r["ds_calls"]
        assert calls["outside"] == 0 and calls["in_forward"] > 0 and calls["outside_bytes"] == 3 * 4, calls


def test_two_bf16_wire_trains_close_to_fp32(two):
    """``comm_dtype: bf16`` learns and stays within bf16 rounding (rtol 2e-2) of the fp32 wire."""
    for r in two:
        assert r["bf16_losses"][-1] < 0.8 * r["bf16_losses"][0], r["bf16_losses"]
        assert _close(r["bf16_losses"], r["k3_losses"], 2e-2), (r["bf16_losses"], r["k3_losses"])


def test_two_comms_log_has_ghost_sized_messages(two):
    """DeepSpeed's comms logger sees the ghost collectives: all-gather input ``[B, k]`` = 4 x 3
    fp32 = 48 bytes (24 in bf16); reduce-scatter input ``[p, B, k]`` = 96 bytes (on gloo an
    all-to-all plus a local sum)."""
    log = two[0]["comms"]
    assert {48, 24} <= _sizes(log, "all_gather_into_tensor"), log
    assert 96 in _sizes(log, "all_to_all_single"), log


def test_two_monitor_writes_phantom_events(two):
    """``log_interval`` writes positive time, throughput and traffic events (energy when a
    counter exists) and the csv monitor turns them into one file each on rank 0."""
    want = {"Phantom/seconds_per_step", "Phantom/samples_per_second", "Phantom/comm_bytes_per_step"}
    for r in two:
        events = r["monitor_events"]
        assert want <= set(events) <= want | {"Phantom/energy_joules_per_step"}, events
        assert all(v > 0 for v in events.values()), events
    csv = {f for f in two[0]["csv_files"] if f.startswith("Phantom_")}
    assert csv == {e.replace("/", "_") for e in two[0]["monitor_events"]}, two[0]["csv_files"]


def test_two_disabled_section_is_plain_deepspeed(two):
    """``enabled: false``: no mpu, no phantom state, no converted layer; the dense data-parallel
    losses."""
    for r in two:
        assert r["disabled_plain"] is True
        assert _close(r["disabled_losses"], r["ref_dp2_losses"], 1e-4), (r["disabled_losses"], r["ref_dp2_losses"])


# ---- case zero: size 2 x data 2

def test_zero_groups_phantom_varies_fastest(zero):
    """Global ranks ``2d, 2d+1`` form a phantom group; ``r % 2, r % 2 + 2`` a data group."""
    for r in zero:
        assert r["phantom_ranks"] == [r["rank"] // 2 * 2, r["rank"] // 2 * 2 + 1]
        assert r["data_ranks"] == [r["rank"] % 2, r["rank"] % 2 + 2]


@pytest.mark.parametrize("stage", ["0", "1", "2"])
def test_zero_stage_trains_like_the_float64_twin(zero, stage):
    """Each ZeRO stage gives the twin's losses (rtol 1e-4) and the others' (rtol 1e-5)."""
    for r in zero:
        assert _close(r["losses"][stage], r["ref_losses"], 1e-4), (r["losses"][stage], r["ref_losses"])
        assert _close(r["losses"][stage], r["losses"]["2"], 1e-5), (r["losses"][stage], r["losses"]["2"])


@pytest.mark.parametrize("stage", ["1", "2"])       # ZeRO-0 in fp32 does not keep the norm
def test_zero_stage_reports_the_global_grad_norm(zero, stage):
    for r in zero:
        assert _close(r["norms"][stage], r["ref_norms"], 1e-4), (r["norms"][stage], r["ref_norms"])


# ---- case pipe: pipe 2 x phantom 2

def test_pipe_turns_boundary_partitioning_off(pipe):
    for r in pipe:
        assert r["pipe_partitioned"] is False and r["grad_partitioned"] is False


def test_pipe_each_stage_converts_its_own_mlp(pipe):
    assert sorted(r["converted"] for r in pipe) == [["1.mlp"]] * 2 + [["2.mlp"]] * 2


def test_pipe_trains_like_the_float64_twin(pipe):
    for r in pipe:
        assert _close(r["losses"], r["ref_losses"], 1e-4), (r["losses"], r["ref_losses"])
        assert r["losses"][-1] < 0.8 * r["losses"][0], r["losses"]


def test_pipe_lr_multipliers_auto_with_warmup(pipe):
    """``"lr_multipliers": "auto"`` with a ``WarmupLR``: the factors' groups at x 0.5 and the
    losses of the float64 twin trained with per-kind lrs (not those of one lr)."""
    for r in pipe:
        assert ["compressor", 0.5] in r["mult_groups"] and ["decompressor", 0.5] in r["mult_groups"], r["mult_groups"]
        assert _close(r["mult_losses"], r["ref_mult_losses"], 1e-4), (r["mult_losses"], r["ref_mult_losses"])
        assert not _close(r["mult_losses"], r["losses"], 1e-3)


# ---- case flag: the config section alone, in a plain DeepSpeed script

# what the site hook (phantom_plugin_autoload.pth) imports at interpreter start: no torch, no layers
HOOK_MODULES = {"phantom_plugin", "phantom_plugin.integrations", "phantom_plugin.integrations.deepspeed_autoload"}


def test_flag_import_hook_applies_the_section(flag):
    """``deepspeed.initialize`` itself (the import hook; the script imports nothing of the plugin,
    only the hook is loaded at start) converts the target modules, and the first loss is the dense one."""
    for r in flag:
        assert set(r["plugin_imported_before"]) <= HOOK_MODULES, r["plugin_imported_before"]
        assert r["converted"] == ["blocks.0.mlp", "blocks.1.mlp"]
        assert abs(r["loss0"] - r["dense_loss0"]) < 1e-6 * r["dense_loss0"], (r["loss0"], r["dense_loss0"])


def test_flag_batches_sharded_by_global_rank_raise(flag):
    """Ranks of one phantom group fed different batches both raise, naming the layer and the fix."""
    for r in flag:
        assert "phantom layer 'blocks.0.mlp.fc1': its input differs across the ranks" in r["mismatch"], r["mismatch"]
        assert "shard data by data-parallel rank" in r["mismatch"], r["mismatch"]


def _warmup_lr(it: int) -> float:
    """DeepSpeed ``WarmupLR`` (linear) after ``it + 1`` scheduler steps (``it = -1``: as built)."""
    return LR_MIN + (LR - LR_MIN) * min(max(it, 0) / WARM, 1.0)


# ---- case mult: 2 ranks, ghost_neurons 3 < width/size = 8, AdamW with weight decay, linear WarmupLR

_M = 1 / (1 + K_MULT / (WIDTH // 2))                        # "auto": lr x 1/(1 + k/(n/p)) for the factors
_AUTO = {"compressor": _M, "decompressor": _M}
_EXPLICIT = {"local": 0.5, "compressor": _M, "decompressor": 2.0, "other": 1.5}
_MULT_RUNS = [("auto0", _AUTO, "ref_auto"), ("auto2", _AUTO, "ref_auto"), ("auto3", _AUTO, "ref_auto"),
              ("explicit1", _EXPLICIT, "ref_explicit")]     # run (setting + ZeRO stage), multipliers, twin


def test_mult_twins_differ(mult):
    """Not vacuous: per-kind lrs change the float64 twin's trajectory."""
    for r in mult:
        assert not _close(r["ref_auto"], r["ref_off"], 1e-3), (r["ref_auto"], r["ref_off"])


@pytest.mark.parametrize("run, want, ref", _MULT_RUNS, ids=[n for n, _, _ in _MULT_RUNS])
def test_mult_groups_by_kind_with_multipliers(mult, run, want, ref):
    """One optimizer group per kind, each with its multiplier (1 for kinds not given)."""
    for r in mult:
        groups = r[run]["groups"]
        assert sorted(k for k, _ in groups) == ["bias", "compressor", "decompressor", "local", "other"]
        for kind, m in groups:
            assert abs(m - want.get(kind, 1.0)) < 1e-12, (kind, m)


@pytest.mark.parametrize("run, want, ref", _MULT_RUNS, ids=[n for n, _, _ in _MULT_RUNS])
def test_mult_scheduler_lr_times_multiplier(mult, run, want, ref):
    """At every step of the warm-up each group's lr is the scheduler's lr x its multiplier."""
    for r in mult:
        for step, lrs in enumerate(r[run]["lrs"]):
            for (kind, _), lr in zip(r[run]["groups"], lrs):
                assert abs(lr - _warmup_lr(step) * want.get(kind, 1.0)) < 1e-12 * LR, (step, kind, lr)


@pytest.mark.parametrize("run, want, ref", _MULT_RUNS, ids=[n for n, _, _ in _MULT_RUNS])
def test_mult_keeps_weight_decay(mult, run, want, ref):
    for r in mult:
        assert r[run]["decay"] == [DECAY] * 5, r[run]["decay"]


@pytest.mark.parametrize("run, want, ref", _MULT_RUNS, ids=[n for n, _, _ in _MULT_RUNS])
def test_mult_trains_like_the_per_kind_twin(mult, run, want, ref):
    for r in mult:
        assert _close(r[run]["losses"], r[ref], 1e-4), (r[run]["losses"], r[ref])


def test_mult_false_keeps_one_group_and_the_plain_trajectory(mult):
    for r in mult:
        off = r["off"]
        assert off["groups"] == [[None, None]]
        assert all(abs(lrs[0] - _warmup_lr(s)) < 1e-12 * LR for s, lrs in enumerate(off["lrs"])), off["lrs"]
        assert _close(off["losses"], r["ref_off"], 1e-4), (off["losses"], r["ref_off"])


def test_mult_explicit_with_client_optimizer_raises(mult):
    """An explicit object with a client optimizer raises, naming the field."""
    for r in mult:
        assert "phantom_parallel.lr_multipliers: {'compressor': 0.5} asks for explicit multipliers, but an " \
               "optimizer was passed" in r["client_explicit"], r["client_explicit"]


def test_mult_auto_with_client_optimizer_advises_on_rank_0(mult):
    """``"auto"`` with a client optimizer leaves its one group; rank 0 (only) prints how to apply them."""
    assert [r["client_auto_groups"] for r in mult] == [1, 1]
    assert "phantom_parallel.lr_multipliers: \"auto\" not applied" in mult[0]["client_auto_out"]
    assert "phantom_plugin.param_groups" in mult[0]["client_auto_out"]
    assert "lr_multipliers" not in mult[1]["client_auto_out"]


def test_example_ffn_script_trains(tmp_path):
    out = launch(2, ROOT / "examples/train_ffn_deepspeed.py",
                 ["--steps", "30", "--width", "64", "--hidden", "128", "--deepspeed", "--deepspeed_config",
                  "ds_configs/phantom_ffn.json"])
    assert "2 module(s) converted" in out, out[-4000:]
    line = [ln for ln in out.splitlines() if "done: loss" in ln][-1]
    first, last = (float(v) for v in line.split("done: loss")[1].split("in")[0].split("->"))
    assert last < 0.7 * first, line


def test_example_pipe_script_trains(tmp_path):
    out = launch(4, ROOT / "examples/train_pipe_deepspeed.py",
                 ["--steps", "15", "--width", "64", "--hidden", "128", "--depth", "2", "--deepspeed",
                  "--deepspeed_config", "ds_configs/phantom_pipe.json"])
    assert "module(s) converted" in out, out[-4000:]
    line = [ln for ln in out.splitlines() if "done: loss" in ln][-1]
    first, last = (float(v) for v in line.split("done: loss")[1].split("in")[0].split("->"))
    assert last < 0.7 * first, line


def test_bad_config_under_launcher_exits_fast(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads((ROOT / "ds_configs/phantom_ffn.json").read_text()),
                               "phantom_parallel": {"enabled": True, "size": 2, "ghost_neuron": 32,
                                                    "target_modules": ["mlp"]}}))
    t0 = time.time()
    out = launch(2, ROOT / "examples/train_ffn_deepspeed.py",
                 ["--steps", "2", "--deepspeed", "--deepspeed_config", str(bad)], expect_fail=True, timeout=240)
    assert "phantom_parallel.ghost_neuron: Extra inputs are not permitted" in out, out[-3000:]
    assert time.time() - t0 < 200


# ============================== rank side (under the launcher) ==============================

def _nets():
    import torch
    from torch import nn

    class FcMLP(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(h, h), nn.GELU(), nn.Linear(h, h)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Residual(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.norm, self.mlp = nn.LayerNorm(WIDTH), mlp

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    def layers():
        torch.manual_seed(0)
        return [nn.Linear(D_IN, WIDTH), Residual(FcMLP(WIDTH)),
                Residual(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))),
                nn.Linear(WIDTH, D_OUT)]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            inp, b0, b1, head = layers()
            self.inp, self.blocks, self.head = inp, nn.ModuleList([b0, b1]), head

        def forward(self, x):
            h = self.inp(x)
            for b in self.blocks:
                h = b(h)
            return self.head(h)

    return Net, layers


def _batch(step: int, shard: int):
    import torch
    g = torch.Generator().manual_seed(1000 * step + shard)
    x = torch.randn(MICRO, D_IN, generator=g)
    a = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(5))
    return x, torch.sin(x @ a)


def _block_linear(lin, p: int, k: int):
    """float64 single-process twin of a converted layer: every rank's ``L_i, C_i, D_ij`` as parameters.

    Same parametrization as the phantom layer (so the same gradients, clipping and AdamW steps),
    initialised by the same truncated SVD, with ``y = x W(L, C, D)^T + b`` and no communication.
    """
    import torch
    from torch import nn
    from phantom_plugin import blocks

    class BlockLinear(nn.Module):
        def __init__(self):
            super().__init__()
            w = lin.weight.detach().double()
            mo, mi = w.shape[0] // p, w.shape[1] // p
            comp, fac = zip(*(blocks.svd_block_column(w, p, k, j)[:2] for j in range(p)))
            decomp = [torch.cat([fac[j][(i if i < j else i - 1) * mo:][:mo] for j in range(p) if j != i], 1)
                      for i in range(p)]
            self.local = nn.ParameterList(w[i * mo:(i + 1) * mo, i * mi:(i + 1) * mi].clone() for i in range(p))
            self.comp = nn.ParameterList(c.clone() for c in comp)
            self.decomp = nn.ParameterList(decomp)
            self.bias = nn.Parameter(lin.bias.detach().double().clone())

        def forward(self, x):
            return x @ blocks.dense_from_blocks(list(self.local), list(self.comp), list(self.decomp)).t() + self.bias

    return BlockLinear()


def _kind(name: str, param) -> str:
    """``phantom_plugin.optim`` kind of a parameter of the float64 twin (:func:`_block_linear`)."""
    for part, kind in ((".comp.", "compressor"), (".decomp.", "decompressor"), (".local.", "local")):
        if part in name:
            return kind
    return "bias" if param.dim() <= 1 else "other"


def _reference(model, steps: int, shards: int, k=None, p: int = 2, mults=None, lr_at=None,
               weight_decay: float = 0.0):
    """float64 training on ``shards`` micro-batches per step; per-shard losses and grad norms.

    With ``k`` the ``nn.Linear`` layers inside ``mlp`` modules get the phantom parametrization
    (:func:`_block_linear`); without it the model is the plain dense one. ``mults``: ``{kind:
    lr multiplier}`` (:func:`_kind`; 1 for kinds not given); ``lr_at(step)``: the base lr of
    each step (default ``LR``); ``weight_decay``: AdamW's, on every parameter.
    """
    import torch
    from torch import nn
    ref = copy.deepcopy(model).double()
    if k is not None:
        for name, mod in list(ref.named_modules()):
            if name.endswith("mlp"):
                for child, lin in list(mod.named_children()):
                    if isinstance(lin, nn.Linear):
                        setattr(mod, child, _block_linear(lin, p, k))
    by_mult: dict = {}
    for name, q in ref.named_parameters():
        by_mult.setdefault(float((mults or {}).get(_kind(name, q), 1.0)), []).append(q)
    opt = torch.optim.AdamW([{"params": ps, "mult": m, "lr": LR * m} for m, ps in by_mult.items()],
                            lr=LR, weight_decay=weight_decay)
    losses, norms = [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = (LR if lr_at is None else lr_at(step)) * g["mult"]
        opt.zero_grad()
        per = []
        for j in range(shards):
            x, y = _batch(step, j)
            per.append(torch.nn.functional.mse_loss(ref(x.double()), y.double()))
        torch.stack(per).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        opt.step()
        losses.append([float(v.detach()) for v in per])
    return losses, norms


def _config(stage=0, **phantom):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
           "gradient_clipping": CLIP, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6,
           "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}
    # one lr for every parameter, as the dense float64 references train (test_lr_multipliers_... turns them on)
    cfg["phantom_parallel"] = {"enabled": True, "size": 2, "ghost_neurons": WIDTH // 2,
                               "target_modules": [r"blocks\.\d+\.mlp"], "lr_multipliers": False, **phantom}
    return cfg


def _train(model, cfg, steps, dp_rank):
    import torch
    from phantom_plugin.deepspeed import initialize
    engine, *_ = initialize(model=model, config=cfg, model_parameters=model.parameters())
    losses, norms = [], []
    for step in range(steps):
        x, y = _batch(step, dp_rank)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        norms.append(engine.get_global_grad_norm())
    return engine, losses, [None if n is None else float(n) for n in norms]


def _case_two(out: dict, tmp: Path) -> None:
    import torch
    import deepspeed
    from phantom_plugin import comm
    from phantom_plugin.convert import PhantomEdgeLinear
    Net, _ = _nets()
    steps = 6
    # first engine of the process: DeepSpeed keeps the last mpu in a global
    cfg = _config()
    cfg["phantom_parallel"]["enabled"] = False
    model = Net()
    engine, out["disabled_losses"], _ = _train(model, cfg, steps, int(os.environ["RANK"]))
    out["disabled_plain"] = (engine.mpu is None and not hasattr(engine, "phantom")
                             and not any(isinstance(m, PhantomEdgeLinear) for m in model.modules()))
    ref2, _ = _reference(Net(), steps, 2)
    out["ref_dp2_losses"] = [l[torch.distributed.get_rank()] for l in ref2]

    dense, _ = _reference(Net(), 1, 1)
    out["dense_loss0"] = dense[0][0]
    ref, norms = _reference(Net(), steps, 1, k=WIDTH // 2)
    out["ref_losses"], out["ref_norms"] = [l[0] for l in ref], norms
    ref, _ = _reference(Net(), steps, 1, k=3)
    out["ref_k3_losses"] = [l[0] for l in ref]

    model = Net()
    engine, out["exact_losses"], _ = _train(model, _config(), steps, 0)
    out["converted"] = [c.name for c in engine.phantom.conversions]
    out["edge_layers"] = sum(isinstance(m, PhantomEdgeLinear) for m in engine.module.modules())

    with comm.CommCounter() as counter:
        _, out["k3_losses"], _ = _train(Net(), _config(ghost_neurons=3), steps, 0)
    out["counter_ghost_numel"] = next(r.numel for r in counter.records if r.tag == "ghosts_fwd")
    engine, out["bf16_losses"], _ = _train(Net(), _config(ghost_neurons=3, comm_dtype="bf16"), steps, 0)
    out["ds_calls"] = _deepspeed_comm_calls(engine)

    cfg = _config(stage=2, log_interval=2)
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp / "csv"), "job_name": "phantom"}
    engine, _, _ = _train(Net(), cfg, 4, 0)
    out["monitor_events"] = {name: value for name, value, _ in engine.phantom.logger.events}
    if torch.distributed.get_rank() == 0:
        out["csv_files"] = sorted(p.stem for p in (tmp / "csv" / "phantom").glob("*.csv"))

    summary = deepspeed.comm.log_summary(return_dict=True) or {}
    out["comms"] = {op: [str(s) for s in sizes] for op, sizes in summary.get("summary", summary).items()
                    if isinstance(sizes, dict)}


def _deepspeed_comm_calls(engine) -> dict:
    """``deepspeed.comm`` all-gathers of a phantom collective issued outside the engine's calls
    (after ``initialize`` returned) and inside a forward of the engine."""
    import torch
    import deepspeed
    from phantom_plugin import comm
    calls, real = [], deepspeed.comm.all_gather_into_tensor

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    deepspeed.comm.all_gather_into_tensor = counted
    try:
        with comm.CommCounter() as counter:
            comm.all_gather(torch.ones(3), engine.phantom.groups.phantom)
        outside = len(calls)
        with torch.no_grad():
            engine(_batch(0, 0)[0])
        return {"outside": outside, "in_forward": len(calls) - outside,
                "outside_bytes": counter.sent_bytes}      # fp32: the engine's bf16 wire not in use
    finally:
        deepspeed.comm.all_gather_into_tensor = real


def _case_zero(out: dict, tmp: Path) -> None:
    Net, _ = _nets()
    steps = 5
    dp_rank = int(os.environ["RANK"]) // 2                # phantom size 2 varies fastest
    ref, norms = _reference(Net(), steps, 2, k=WIDTH // 2)
    out["losses"], out["norms"] = {}, {}
    for stage in (0, 1, 2):
        engine, losses, gnorms = _train(Net(), _config(stage=stage), steps, dp_rank)
        out["losses"][str(stage)], out["norms"][str(stage)] = losses, gnorms
    out["ref_losses"], out["ref_norms"] = [l[dp_rank] for l in ref], norms
    out["phantom_ranks"] = list(engine.phantom.groups.phantom_ranks)
    out["data_ranks"] = list(engine.phantom.groups.data_ranks)


def _case_flag(out: dict, tmp: Path) -> None:
    import torch
    import deepspeed
    Net, _ = _nets()
    out["converted"] = []
    model = Net()
    engine, *_ = deepspeed.initialize(model=model, config=_config(), model_parameters=model.parameters())
    out["converted"] = [c.name for c in engine.phantom.conversions]
    x, y = _batch(0, 0)
    out["loss0"] = float(torch.nn.functional.mse_loss(engine(x), y))
    out["dense_loss0"] = _reference(Net(), 1, 1)[0][0][0]
    model = Net()
    engine, *_ = deepspeed.initialize(model=model, config=_config(), model_parameters=model.parameters())
    x, y = _batch(0, torch.distributed.get_rank())          # a loader sharded by global rank
    try:
        engine(x)
        out["mismatch"] = "no error"
    except RuntimeError as e:
        out["mismatch"] = str(e)


def _case_mult(out: dict, tmp: Path) -> None:
    import contextlib
    import io
    import torch
    from phantom_plugin.deepspeed import PhantomConfigError, initialize
    Net, _ = _nets()
    steps = 6
    warm = {"type": "WarmupLR", "params": {"warmup_min_lr": LR_MIN, "warmup_max_lr": LR,
                                           "warmup_num_steps": WARM, "warmup_type": "linear"}}
    m = 1 / (1 + K_MULT / (WIDTH // 2))
    explicit = {"local": 0.5, "decompressor": 2.0, "other": 1.5}
    lr_at = lambda step: _warmup_lr(step - 1)        # noqa: E731  the lr optimizer step `step` uses
    for name, mults in (("auto", {"compressor": m, "decompressor": m}), ("off", None),
                        ("explicit", {**explicit, "compressor": m})):
        ref, _ = _reference(Net(), steps, 1, k=K_MULT, mults=mults, lr_at=lr_at, weight_decay=DECAY)
        out[f"ref_{name}"] = [l[0] for l in ref]

    def run(stage, setting):
        cfg = _config(stage=stage, ghost_neurons=K_MULT, lr_multipliers=setting)
        cfg["optimizer"]["params"]["weight_decay"] = DECAY
        cfg["scheduler"] = copy.deepcopy(warm)
        model = Net()
        engine, *_ = initialize(model=model, config=cfg, model_parameters=model.parameters())
        groups = engine.optimizer.param_groups
        rec = {"groups": [[g.get("kind"), g.get("lr_mult")] for g in groups], "lrs": [], "losses": [],
               "decay": [g["weight_decay"] for g in groups]}
        for step in range(steps):
            x, y = _batch(step, 0)
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            rec["losses"].append(float(loss))
            rec["lrs"].append([g["lr"] for g in groups])
        return rec

    for stage in (0, 2, 3):
        out[f"auto{stage}"] = run(stage, "auto")
    out["explicit1"] = run(1, explicit)
    out["off"] = run(2, False)

    def client_cfg(setting):       # a client optimizer and no "optimizer" section (Trainer's AdamW)
        cfg = _config(lr_multipliers=setting)
        del cfg["optimizer"]
        return cfg

    model = Net()
    try:
        initialize(model=model, config=client_cfg({"compressor": 0.5}),
                   optimizer=torch.optim.AdamW(model.parameters(), lr=LR))
        out["client_explicit"] = "no error"
    except PhantomConfigError as e:
        out["client_explicit"] = str(e)
    model = Net()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        engine, *_ = initialize(model=model, config=client_cfg("auto"),
                                optimizer=torch.optim.AdamW(model.parameters(), lr=LR))
    out["client_auto_out"] = buf.getvalue()
    out["client_auto_groups"] = len(engine.optimizer.param_groups)


def _case_pipe(out: dict, tmp: Path) -> None:
    import torch
    from deepspeed.pipe import PipelineModule
    import deepspeed
    from phantom_plugin.deepspeed import initialize, phantom_topology
    _, layers = _nets()
    steps, gas = 5, 2
    cfg = _config(target_modules=["mlp"])       # PipelineModule names its layers "0", "1", ...
    cfg["gradient_accumulation_steps"] = gas
    deepspeed.init_distributed()
    dense = layers()
    topo = phantom_topology(cfg, num_stages=2)
    model = PipelineModule(layers=copy.deepcopy(dense), topology=topo, partition_method="uniform",
                           loss_fn=torch.nn.functional.mse_loss)
    engine, *_ = initialize(model=model, config=cfg, model_parameters=model.parameters())
    out["pipe_partitioned"], out["grad_partitioned"] = engine.is_pipe_partitioned, engine.is_grad_partitioned
    out["converted"] = [c.name for c in engine.phantom.conversions]
    losses = []
    for step in range(steps):
        it = iter([_batch(step, j) for j in range(gas)])
        losses.append(float(engine.train_batch(data_iter=it)))
    out["losses"] = losses
    ref, _ = _reference(torch.nn.Sequential(*dense), steps, gas, k=WIDTH // 2)
    out["ref_losses"] = [sum(l) / gas for l in ref]

    # "lr_multipliers": "auto" (the factors at lr x 0.5: k = in/size) and a WarmupLR, scaled per group
    cfg = _config(target_modules=["mlp"], lr_multipliers="auto")
    cfg["gradient_accumulation_steps"] = gas
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": LR_MIN, "warmup_max_lr": LR,
                                                       "warmup_num_steps": WARM, "warmup_type": "linear"}}
    model = PipelineModule(layers=copy.deepcopy(dense), topology=topo, partition_method="uniform",
                           loss_fn=torch.nn.functional.mse_loss)
    engine, *_ = initialize(model=model, config=cfg, model_parameters=model.parameters())
    out["mult_groups"] = [[g.get("kind"), g.get("lr_mult")] for g in engine.optimizer.param_groups]
    out["mult_losses"] = [float(engine.train_batch(data_iter=iter([_batch(step, j) for j in range(gas)])))
                          for step in range(steps)]
    ref, _ = _reference(torch.nn.Sequential(*dense), steps, gas, k=WIDTH // 2,
                        mults={"compressor": 0.5, "decompressor": 0.5}, lr_at=lambda step: _warmup_lr(step - 1))
    out["ref_mult_losses"] = [sum(l) / gas for l in ref]


def _main() -> None:
    import faulthandler
    faulthandler.enable(all_threads=True)       # an abort in a rank prints where each thread was
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    plugin_imported_before = sorted(m for m in sys.modules if m == "phantom_plugin" or m.startswith("phantom_plugin."))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    out: dict = {}
    tmp = Path(args.out)
    out["plugin_imported_before"] = plugin_imported_before
    {"two": _case_two, "zero": _case_zero, "pipe": _case_pipe, "flag": _case_flag,
     "mult": _case_mult}[args.case](out, tmp)
    out["rank"] = dist.get_rank()
    out["node"] = os.environ.get("GROUP_RANK", os.environ.get("CROSS_RANK"))     # torchrun / deepspeed
    from dist_utils import finish_rank
    finish_rank(tmp, out)


if __name__ == "__main__":
    _main()
