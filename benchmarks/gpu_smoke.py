"""One-GPU smoke test of the plugin's own code on CUDA (run by ``benchmarks/gpu_check.sh``).

Checks, each written to ``OUT/gpu_smoke.json`` as soon as it ends (a timeout loses nothing):

* ``simulated_ranks``: the phantom op (``phantom_plugin.ops``) of ``p`` = 4 ranks run one after
  another on one device, the ghost all-gather replaced by every rank's true ghosts and the
  reduce-scatter by the true sum of the other ranks' ghost grads (checked against what each rank
  put in its send buffer). fp32 against a float64 dense reference assembled from the same blocks
  (tolerance 1e-4 of each tensor's scale: TF32 is off here), bf16 and fp32 parameters under
  ``torch.autocast`` bf16 against fp32 (3e-2: bf16 rounding).
* ``from_dense``: :meth:`PhantomLinear.from_dense` of a bf16 weight on the device (SVD in float64
  on the device, exact at full rank) and ``to_dense`` back.
* ``gloo_ranks_on_device``: two gloo ranks sharing the device: construction, ``from_dense``,
  forward/backward and ``to_dense`` with device tensors, which the plugin moves through gloo.
* ``energy``: one :class:`EnergyMeter` window of at least ``window_s`` seconds of GEMMs.

``python benchmarks/gpu_smoke.py --device cpu --window-s 0`` runs the same checks on CPU (the
tests do).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from phantom_plugin import PhantomLinear, blocks, comm, energy, init, ops  # noqa: E402

N_IN, N_OUT, K, P, B = 256, 128, 8, 4, 64


_SIMULATED = object()
"""Stands for the group of simulated ranks inside :func:`_exchange`."""


@contextlib.contextmanager
def _exchange(p: int, ghosts: torch.Tensor, dg: torch.Tensor, sent: list):
    """Inside: ``_SIMULATED`` is a group of ``p`` ranks whose ghost all-gather returns
    ``ghosts [p, B, k]`` and whose reduce-scatter records the send buffer and returns ``dg``."""
    size, ag, rs = comm.group_size, comm.all_gather, comm.reduce_scatter

    def group_size(group):
        return p if group is _SIMULATED else size(group)

    def all_gather(x, group, *, async_op=False, tag=""):
        return comm.Handle(None, ghosts) if async_op else ghosts

    def reduce_scatter(x, group, *, async_op=False, tag=""):
        sent.append(x.detach().clone())
        return comm.Handle(None, dg) if async_op else dg
    comm.group_size, comm.all_gather, comm.reduce_scatter = group_size, all_gather, reduce_scatter
    try:
        yield
    finally:
        comm.group_size, comm.all_gather, comm.reduce_scatter = size, ag, rs


def simulate_ranks(device, dtype, autocast: bool, p: int = P, seed: int = 3) -> dict:
    """Every rank's output and grads from the real op, and the float64 dense reference's."""
    params = [{n: t.to(device) for n, t in blk.items()} for blk in init.master_blocks(seed, N_IN, N_OUT, K, p)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N_IN, generator=g, dtype=torch.float64).to(device)
    dy = torch.randn(B, N_OUT, generator=g, dtype=torch.float64).to(device)
    mi, mo = N_IN // p, N_OUT // p
    # reference: dense float64 with autograd
    leaves = [{n: t.double().requires_grad_() for n, t in blk.items()} for blk in params]
    w = blocks.dense_from_blocks([l["local_weight"] for l in leaves], [l["compressor"] for l in leaves],
                                 [l["decompressor"] for l in leaves])
    xr = x.clone().requires_grad_()
    y_ref = xr @ w.t() + torch.cat([l["bias"] for l in leaves])
    (y_ref * dy).sum().backward()
    # the true exchange
    run = [{n: t.to(dtype) for n, t in blk.items()} for blk in params]
    xs = [x[:, r * mi:(r + 1) * mi].to(dtype) for r in range(p)]
    ghosts = torch.stack([xs[r] @ run[r]["compressor"].t() for r in range(p)]).to(dtype)    # [p, B, k]
    d_of = [blocks.split_decompressor(leaves[i]["decompressor"].detach(), p, i) for i in range(p)]
    dg = [sum(dy[:, i * mo:(i + 1) * mo] @ d_of[i][j] for i in range(p) if i != j) for j in range(p)]
    worst, sent = {}, []
    for r in range(p):
        leaf = {n: t.clone().requires_grad_() for n, t in run[r].items()}
        xin = xs[r].clone().requires_grad_()
        exchanged = torch.bfloat16 if autocast else dtype
        with _exchange(p, ghosts.to(exchanged), dg[r].to(exchanged), sent), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = ops.phantom_linear(xin, leaf["local_weight"], leaf["compressor"], leaf["decompressor"],
                                   leaf["bias"], _SIMULATED, r)
            grads = torch.autograd.grad(y, [xin] + list(leaf.values()), dy[:, r * mo:(r + 1) * mo].to(y.dtype))
        if autocast:   # nn.Linear's contract: bf16 output, grads in the parameters' own dtype
            right = y.dtype == torch.bfloat16 and all(gr.dtype == dtype for gr in grads)
            worst["autocast_dtypes_wrong"] = max(worst.get("autocast_dtypes_wrong", 0.0), 0.0 if right else 1.0)
        pairs = [("y", y, y_ref[:, r * mo:(r + 1) * mo]), ("dx", grads[0], xr.grad[:, r * mi:(r + 1) * mi])]
        pairs += [(n, gr, leaves[r][n].grad) for n, gr in zip(leaf, grads[1:])]
        for name, got, ref in pairs:
            err = float((got.detach().double() - ref).abs().max() / ref.abs().max())
            worst[name] = max(worst.get(name, 0.0), err)
    # what the ranks put in their send buffers sums to each rank's ghost grads
    for j in range(p):
        total = sum(sent[i][j].double() for i in range(p))
        worst["send_buffers"] = max(worst.get("send_buffers", 0.0),
                                    float((total - dg[j]).abs().max() / dg[j].abs().max()))
    return worst


def check_from_dense(device) -> dict:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(N_OUT, N_IN, generator=g).to(device=device, dtype=torch.bfloat16)
    layer = PhantomLinear.from_dense(w, None, ghost_dim=K)
    back, _ = layer.to_dense()
    # the SVD from_dense runs per block column at p > 1, here on the device (float64, full rank)
    mi, mo = N_IN // P, N_OUT // P
    comp, fac, dropped = blocks.svd_block_column(w, P, mi, 1)
    column = w[:, mi:2 * mi].double()
    stacked = torch.cat([column[:mo], column[2 * mo:]])
    return {"device": str(layer.local_weight.device), "dtype": str(layer.local_weight.dtype),
            "svd_device": str(fac.device), "round_trip_err": float((back.float() - w.float()).abs().max()),
            "svd_err": float((fac @ comp - stacked).abs().max() / stacked.abs().max()),
            "svd_dropped": float(dropped)}


def _gloo_rank(rank, world, device_str):
    import torch.distributed as dist
    device = torch.device(device_str)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N_OUT, N_IN, generator=g, dtype=torch.float64).to(device)
    layer = PhantomLinear.from_dense(w, None, ghost_dim=N_IN // world, group=dist.group.WORLD)
    built = PhantomLinear(N_IN, N_OUT, ghost_dim=K, group=dist.group.WORLD, device=device)
    x = torch.randn(B, N_IN, generator=g, dtype=torch.float64).to(device)
    mi, mo = N_IN // world, N_OUT // world
    xin = x[:, rank * mi:(rank + 1) * mi].clone().requires_grad_()
    y = layer(xin)
    y.sum().backward()
    w2, _ = layer.to_dense()
    return {"y_err": float((y.detach() - (x @ w.t())[:, rank * mo:(rank + 1) * mo]).abs().max()),
            "to_dense_err": float((w2 - w).abs().max()), "grad_device": str(xin.grad.device),
            "built_device": str(built.local_weight.device), "seed_agreed": built.seed}


def check_gloo_ranks(device) -> dict:
    from phantom_plugin.bench.launch import run_ranks
    out = run_ranks(_gloo_rank, 2, str(device), timeout=300)
    return {"ranks": out, "same_seed": out[0]["seed_agreed"] == out[1]["seed_agreed"]}


def check_energy(device, window_s: float) -> dict:
    meter = energy.EnergyMeter(device)
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    meter.begin_window("smoke")
    t0, n = time.perf_counter(), 0
    while True:
        a @ a
        n += 1
        if device.type == "cuda" and n % 20:
            continue
        if time.perf_counter() - t0 >= window_s:
            break
    m = meter.end_window("smoke")
    return {**m.as_dict(), "gemms": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--window-s", type=float, default=5.0, help="energy window, seconds (NVML: >= 5)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:             # set_device needs an index: "cuda" means the current one
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_smoke.json")
    doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "checks": {}}
    checks = [
        ("simulated_ranks_fp32", lambda: simulate_ranks(device, torch.float32, False), 1e-4),
        ("simulated_ranks_bf16", lambda: simulate_ranks(device, torch.bfloat16, False), 3e-2),
        ("simulated_ranks_autocast_bf16", lambda: simulate_ranks(device, torch.float32, True), 3e-2),
        ("from_dense", lambda: check_from_dense(device), None),
        ("gloo_ranks_on_device", lambda: check_gloo_ranks(device), None),
        ("energy", lambda: check_energy(device, args.window_s), None),
    ]
    failed = 0
    for name, fn, tol in checks:
        t0 = time.perf_counter()
        try:
            res = fn()
            ok = all(v < tol for v in res.values()) if tol is not None else _ok(name, res)
        except Exception:
            res, ok = {"error": traceback.format_exc()[-3000:]}, False
        failed += not ok
        doc["checks"][name] = {"ok": ok, "seconds": time.perf_counter() - t0, **({"tolerance": tol} if tol else {}),
                               "result": res}
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"{name}: {'ok' if ok else 'FAILED'} {json.dumps(res, default=str)[:400]}", flush=True)
    return 1 if failed else 0


def _ok(name: str, res: dict) -> bool:
    if name == "from_dense":
        return res["round_trip_err"] == 0 and res["svd_err"] < 1e-10 and res["svd_dropped"] < 1e-10
    if name == "gloo_ranks_on_device":
        return res["same_seed"] and all(r["y_err"] < 1e-10 and r["to_dense_err"] < 1e-10 for r in res["ranks"])
    return True   # energy: a reading or a reason, both recorded


if __name__ == "__main__":
    raise SystemExit(main())
