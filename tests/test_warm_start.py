"""Warm start from a short dense phase, on real gloo ranks, against the single-process study.

Each of 2 ranks trains a dense ``nn.Sequential`` FFN for ``S0`` steps data-parallel (half the
batch each, gradients averaged with an all-reduce, weights replicated), converts it with
``convert_modules(init="dense")`` (``PhantomLinear.from_dense``: truncated SVD, one
factorisation all-gathered) and carries on as phantom with a fresh Adam over ``param_groups``.
The reference is ``benchmarks/param_study.py``'s own warm start (``--warm S0 --variant defaults``)
in one process: dense full-batch steps, ``blocks.blocks_from_dense``, the simulated phantom FFN.
float64 throughout: every loss and every rank's blocks, at the conversion and after the phantom
steps, must agree to rounding (1e-9).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from dist_utils import run_ranks
from phantom_plugin import init, param_groups
from phantom_plugin.bench.workload import teacher_batch
from phantom_plugin.convert import convert_modules

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import param_study  # noqa: E402

WIDTH, DEPTH, K, BATCH, LR, SEED = 16, 3, 2, 8, 1e-2, 5
S0, STEPS = 4, 9                 # 4 dense steps, then 5 phantom steps


def _dense_model():
    layers = []
    for l in range(DEPTH):
        lin = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(init.dense_master(init.derive_seed(SEED, l), WIDTH, WIDTH))
            lin.bias.copy_(init.dense_bias(init.derive_seed(SEED, l), WIDTH, WIDTH))
        layers += [lin] + ([nn.GELU()] if l < DEPTH - 1 else [])
    return nn.Sequential(*layers)


def _blocks(model):
    """This rank's ``(L, C, D, b)`` per layer, as lists (tensors do not survive the rank's exit)."""
    return [tuple(t.detach().tolist() for t in (m.phantom.local_weight, m.phantom.compressor,
                                                m.phantom.decompressor, m.phantom.bias))
            for m in model if hasattr(m, "phantom")]


def _warm_ranks(rank, p):
    g = dist.group.WORLD
    model = _dense_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    losses, half = [], BATCH // p
    for step in range(S0):                                      # dense phase, data-parallel
        x, y = teacher_batch(step, BATCH, WIDTH, SEED, dtype=torch.float64)
        loss = nn.functional.mse_loss(model(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for t in model.parameters():
            dist.all_reduce(t.grad, group=g)
            t.grad /= p
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=g)
        losses.append(float(total) / p)
    done = convert_modules(model, ["^$"], ghost_dim=K, group=g, init="dense")
    at_conversion = _blocks(model)
    opt = torch.optim.Adam(param_groups(model, LR), lr=LR)      # fresh state for the phantom params
    for step in range(S0, STEPS):                               # phantom phase, replicated batch
        x, y = teacher_batch(step, BATCH, WIDTH, SEED, dtype=torch.float64)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out = {"losses": losses, "error": done[0].approx_error, "at_conversion": at_conversion,
           "final": _blocks(model)}
    return out


def _study(p):
    args = argparse.Namespace(width=WIDTH, depth=DEPTH, ranks=p, ghosts=K, batch=BATCH, steps=STEPS,
                              lr=LR, seed=SEED, every=1)
    snaps = {}
    dense = param_study.run(param_study.DenseFFN(WIDTH, DEPTH, SEED, dtype=torch.float64),
                            argparse.Namespace(**dict(vars(args), steps=S0)), {}, "dense",
                            snapshots={S0}, snapshot_to=snaps)
    phantom = param_study.to_phantom(snaps[S0], K, p)
    at_conversion = [[tuple(t.detach().clone() for t in (phantom.L[l * p + r], phantom.C[l * p + r],
                                                          phantom.D[l * p + r], phantom.b[l * p + r]))
                      for r in range(p)] for l in range(DEPTH)]
    mult = param_study.variant_mults({}, {"parametrization": "defaults"}, K, WIDTH, p)
    warm = param_study.run(phantom, args, mult, "warm", start=S0)
    final = [[(phantom.L[l * p + r], phantom.C[l * p + r], phantom.D[l * p + r], phantom.b[l * p + r])
              for r in range(p)] for l in range(DEPTH)]
    return dense["losses"] + warm["losses"], at_conversion, final


def test_warm_start_matches_param_study():
    p = 2
    results = run_ranks(_warm_ranks, p)
    losses, at_conversion, final = _study(p)
    assert len(losses) == STEPS
    for rank, res in enumerate(results):
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(losses), rtol=1e-9, atol=0)
        for name, got, want in (("conversion", res["at_conversion"], at_conversion),
                                ("final", res["final"], final)):
            for l in range(DEPTH):
                for kind, a, b in zip("LCDb", got[l], want[l][rank]):
                    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), b.detach(), rtol=0, atol=1e-9,
                                               msg=lambda m, where=f"rank {rank} layer {l} {kind} ({name})": f"{where}: {m}")
    # not vacuous: k = 2 of n/p = 8 drops a real part of the dense weights, and the phantom
    # steps move the blocks away from the conversion
    assert results[0]["error"] > 0.05
    moved = torch.tensor(results[0]["final"][0][1]) - torch.tensor(results[0]["at_conversion"][0][1])
    assert moved.abs().max() > 1e-4
