"""What a GPU user hits first, exercised on CPU wherever the mechanism exists here.

* autocast: the phantom op under ``torch.autocast("cpu", dtype=torch.bfloat16)`` behaves as
  ``nn.Linear`` does (bf16 output, parameter grads in the parameters' fp32), and equals, bit for
  bit, the same layer run in bf16 without autocast (the casts are the only difference);
* meta-device and default-device construction, materialised deterministically;
* ``seed=None`` with ranks seeded differently: the group takes its first rank's draw;
* collective device choice from the tensor and the group's per-device backends, on a world
  initialised without a backend (torch reports ``"undefined"``); NCCL variants are skipped
  without two GPUs;
* ``PhantomMLP`` honouring ``perform_initialization`` and the meta device.
All multi-rank cases run on real gloo ranks.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from phantom_plugin import PhantomFFN, PhantomLinear, comm, init, placement
from phantom_plugin.convert import convert_modules

N_IN, N_OUT, K = 32, 16, 4


# --- autocast ---------------------------------------------------------------------------------

def _run(layer, x, autocast: bool):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
        y.float().pow(2).sum().backward()        # backward inside the region too (CPU runs it here)
    return y, x.grad, {n: t.grad for n, t in layer.named_parameters()}


def _autocast_rank(rank, p):
    g = dist.group.WORLD
    x = torch.randn(2, 8, N_IN // p, generator=torch.Generator().manual_seed(rank))
    fp32 = PhantomLinear(N_IN, N_OUT, ghost_dim=K, group=g, seed=3)
    y, dx, grads = _run(fp32, x, autocast=True)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in grads.values()), {n: t.dtype for n, t in grads.items()}
    # the same layer held in bf16, run without autocast: identical numbers
    bf16 = PhantomLinear(N_IN, N_OUT, ghost_dim=K, group=g, seed=3, dtype=torch.bfloat16)
    y_b, dx_b, grads_b = _run(bf16, x.to(torch.bfloat16), autocast=False)
    assert torch.equal(y, y_b) and torch.equal(dx, dx_b.float())
    for name, grad in grads.items():
        assert torch.equal(grad, grads_b[name].float()), name
    # against the fp32 run: bf16 rounding only (8 mantissa bits, sums of <= 32 terms)
    y_f, dx_f, grads_f = _run(fp32_copy(fp32), x, autocast=False)
    for a, b in [(y_f, y), (dx_f, dx)] + [(grads_f[n], grads[n]) for n in grads]:
        err = (a.float() - b.float()).abs().max() / a.abs().max()
        assert err < 3e-2, float(err)
    # nn.Linear parity: the dense equivalent under the same autocast gives the same dtype and values
    w, b = fp32.to_dense()
    x_full = torch.cat(comm.all_gather(x, g).unbind(0), dim=-1)           # [2, 8, N_IN]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_dense = torch.nn.functional.linear(x_full, w, b)
    mo = N_OUT // p
    assert y_dense.dtype == y.dtype
    own = y_dense[..., rank * mo:(rank + 1) * mo].float()
    assert ((own - y.float()).abs().max() / own.abs().max()) < 3e-2
    return True


def fp32_copy(layer):
    twin = PhantomLinear(N_IN, N_OUT, ghost_dim=K, group=layer.group, seed=layer.seed)
    twin.load_state_dict(layer.state_dict())
    return twin


def test_autocast_bf16_on_cpu_behaves_like_nn_linear():
    assert run_ranks(_autocast_rank, 2) == [True, True]


# --- seeds --------------------------------------------------------------------------------------

def _seed_rank(rank, p, mixed):
    torch.manual_seed(100 + rank)                      # what training scripts often do
    if mixed:
        PhantomLinear(8, 8, ghost_dim=1, group=dist.group.WORLD, seed=5 if rank == 0 else None)
    layer = PhantomLinear(8, 8, ghost_dim=1, group=dist.group.WORLD)
    ffn = PhantomFFN(8, 3, ghost_dim=1, group=dist.group.WORLD)
    expected = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=torch.Generator().manual_seed(100)))
    ref = init.master_blocks(layer.seed, 8, 8, 1, p)[rank]
    same = all(torch.equal(getattr(layer, n).detach(), t) for n, t in ref.items())
    return layer.seed, expected, (ffn.seed, [l.seed for l in ffn.layers]), same


def test_seed_none_takes_the_first_ranks_draw():
    results = run_ranks(_seed_rank, 2, False)
    (s0, expected, ffn0, same0), (s1, _, ffn1, same1) = results
    assert s0 == s1 == expected and same0 and same1
    base, layers = ffn0
    assert ffn0 == ffn1 and layers == [init.derive_seed(base, l) for l in range(3)]


def test_explicit_and_default_seeds_mixed_fail_together():
    for status, text in run_ranks(_seed_rank, 2, True, allow_failures=True, timeout=60):
        assert status == "error" and "ranks disagree on `seed_given`" in text, text


# --- meta and default device --------------------------------------------------------------------

def _meta_rank(rank, p):
    g = dist.group.WORLD
    with torch.device("meta"):
        layer = PhantomLinear(N_IN, N_OUT, ghost_dim=K, group=g, seed=9)
    assert all(t.is_meta for t in layer.parameters())
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    ref = init.master_blocks(9, N_IN, N_OUT, K, p)[rank]
    assert all(torch.equal(getattr(layer, n).detach(), t) for n, t in ref.items())
    assert all(getattr(t, "tensor_model_parallel", False) for t in layer.parameters())
    torch.set_default_device("meta")
    try:
        ffn = PhantomFFN(N_IN, 2, ghost_dim=K, group=g)                # seed=None under a meta default
        assert all(t.is_meta for t in ffn.parameters())
        cpu = PhantomLinear(N_IN, N_OUT, ghost_dim=K, group=g, seed=9, device="cpu")
    finally:
        torch.set_default_device("cpu")
    assert all(torch.equal(getattr(cpu, n).detach(), t) for n, t in ref.items())
    return True


def test_meta_and_default_device_construction_materialise_deterministically():
    run_ranks(_meta_rank, 2)


# --- collective device choice ---------------------------------------------------------------------

@pytest.mark.fast
def test_backend_strings_map_to_devices():
    parse = lambda s: dict(placement._parse_backends(s))  # noqa: E731
    assert parse("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert parse("nccl") == {"cuda": "nccl"}
    assert parse("gloo") == {"cpu": "gloo"}
    assert parse("undefined") == {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl"}
    assert parse("cuda:nccl") == {"cuda": "nccl"}


def _undefined_rank(rank, p):
    g = dist.group.WORLD
    assert comm.collective_device(g) == torch.device("cpu")
    assert comm.collective_device(g, torch.zeros(1)) == torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N_OUT, N_IN, dtype=torch.float64, generator=gen)
    layer = PhantomLinear.from_dense(w, None, ghost_dim=N_IN // p, group=g)
    w2, _ = layer.to_dense()
    torch.testing.assert_close(w2, w, rtol=0, atol=1e-12)
    x = torch.randn(3, N_IN, dtype=torch.float64, generator=gen)
    mi, mo = N_IN // p, N_OUT // p
    y = layer(x[:, rank * mi:(rank + 1) * mi])
    torch.testing.assert_close(y, (x @ w.t())[:, rank * mo:(rank + 1) * mo], rtol=0, atol=1e-12)
    return str(dist.get_backend())


def test_world_without_a_backend_runs_collectives_on_the_tensors_device():
    backends = run_ranks(_undefined_rank, 2, backend=None)
    assert backends[0] in ("undefined", "gloo"), backends


def _converted_then_moved(rank, p, device, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(N_IN, N_OUT), torch.nn.GELU(), torch.nn.Linear(N_OUT, N_IN))
    dense = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in (model[0], model[2])]
    convert_modules(model, [r"^$"], ghost_dim=N_OUT // p, group=dist.group.WORLD)   # on the CPU
    model.to(device=device, dtype=dtype)
    x = torch.randn(5, N_IN, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    y = model(x)
    y.sum().backward()
    (w1, b1), (w2, b2) = [(w.to(device, dtype), b.to(device, dtype)) for w, b in dense]
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    return float((y - ref).abs().max())


def test_cpu_built_model_converted_then_moved():
    errors = run_ranks(_converted_then_moved, 2, torch.device("cpu"), torch.float64)
    assert max(errors) < 1e-5, errors          # float32 SVD inputs, exact rank: float32 rounding


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices and NCCL")
def test_cpu_built_model_converted_over_nccl_then_moved_to_cuda():
    errors = [e for e in run_ranks(_converted_then_moved_cuda, 2, backend="nccl")]
    assert max(errors) < 1e-2, errors


def _converted_then_moved_cuda(rank, p):
    return _converted_then_moved(rank, p, torch.device("cuda", rank), torch.float32)


# --- PhantomMLP initialisation ----------------------------------------------------------------------

def _mlp_rank(rank, p):
    import megatron_utils as mu
    from phantom_plugin.megatron import PhantomMLP
    mu.init_megatron(p)
    draws = []
    original = PhantomLinear.reset_parameters

    def counting(self):
        if not self.local_weight.is_meta:
            draws.append(self.seed)
        original(self)
    PhantomLinear.reset_parameters = counting
    try:
        out = {}
        for name, extra in (("skip", {"perform_initialization": False}),
                            ("meta", {"init_model_with_meta_device": True, "use_cpu_initialization": False}),
                            ("draw", {})):
            draws.clear()
            mlp = PhantomMLP(mu.make_config(p, hidden_size=16, ffn_hidden_size=24, **extra), ghost_dim=2, seed=7)
            mlp.set_layer_number(3)
            out[name] = (len(draws), all(t.is_meta for t in mlp.parameters()))
            if name == "meta":                     # materialise as megatron's FSDP does
                for layer in (mlp.linear_fc1, mlp.linear_fc2):
                    layer.to_empty(device="cpu")
                    layer.reset_parameters()
            if name in ("meta", "draw"):
                s1 = init.derive_seed(7, 3, "linear_fc1")
                ref = init.master_blocks(s1, 16, 24, 2, p)[rank]
                out[name] += (all(torch.equal(getattr(mlp.linear_fc1, n).detach(), t) for n, t in ref.items()),
                              all(getattr(t, "tensor_model_parallel", False) for t in mlp.parameters()))
    finally:
        PhantomLinear.reset_parameters = original
    return out


def test_phantom_mlp_honours_perform_initialization_and_meta_device():
    pytest.importorskip("megatron.core")
    for out in run_ranks(_mlp_rank, 2):
        assert out["skip"] == (0, False), out
        assert out["meta"] == (0, True, True, True), out
        assert out["draw"][1:] == (False, True, True), out
        assert out["draw"][0] == 4, out            # layer-0 seeds at construction, layer 3's after


# --- the GPU script's smoke test, on CPU ----------------------------------------------------------

def test_gpu_smoke_script_passes_on_cpu(tmp_path):
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_smoke.py"), "--device", "cpu",
                    "--window-s", "0", "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    doc = json.load(open(tmp_path / "gpu_smoke.json"))
    assert all(c["ok"] for c in doc["checks"].values()), doc
    assert set(doc["checks"]) >= {"simulated_ranks_fp32", "simulated_ranks_autocast_bf16", "from_dense",
                                  "gloo_ranks_on_device", "energy"}


@pytest.mark.fast
def test_gpu_extrapolation_states_the_link_and_overlaps_only_what_the_code_can():
    import argparse
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import gpu_layer_check as g
    args = argparse.Namespace(gpus_per_node=8, nvlink_gbs=450.0, net_gbs=50.0, pj_per_byte=80.0)
    for p, words in ((8, "NVLink"), (16, "inter-node")):
        gbs = 450.0 if p == 8 else 50.0
        row = {"p": p, "phantom_bytes": 1.0 * gbs * 1e9, "tp_bytes": 0.4 * gbs * 1e9,  # 0.5 s per ghost collective, 0.4 s per all-reduce
               "overlap": {"phantom_fwd_s": 0.1, "phantom_bwd_s": 0.2, "tp_weight_grad_s": 0.3},
               "phantom": {"time_s": 1.0, "energy_j": None}, "tp": {"time_s": 1.0, "energy_j": 2.0}}
        g.extrapolate(row, args)
        assert words in row["link"] and row["link_gbs_per_direction"] == gbs
        ph, tp = row["phantom"], row["tp"]
        assert ph["extrapolated_step_s_serial"] == pytest.approx(2.0)
        # only the 0.1 s + 0.2 s of local GEMMs hide the 2 x 0.5 s exchange
        assert ph["extrapolated_step_s_overlapped"] == pytest.approx(1.0 - 0.3 + 0.5 + 0.5)
        # per layer of a pair: forward all-reduce serial, backward one hidden by the 0.3 s weight grad
        assert tp["extrapolated_step_s_overlapped"] == pytest.approx((2.0 + 0.4 + 0.1) / 2)
        assert tp["extrapolated_energy_j"] == pytest.approx(2.0 + 0.4 * gbs * 1e9 * 80e-12)
