"""Single-process study of phantom parametrisations on the teacher FFN task (issue 12).

Simulates a ``PhantomFFN`` of ``p`` ranks in one process by assembling each layer's exact dense
equivalent ``W = [L_i on the diagonal, D_ij C_j off it]`` from trainable blocks (the same function
and gradients as the distributed op, which ``tests/test_layers.py`` checks against float64), and a
dense (TP-equivalent) FFN from ``init.dense_master``. Both train on ``runner.teacher_batch`` with
Adam; per-kind parameter groups come from :func:`phantom_plugin.optim.param_groups`-style
multipliers given on the command line. Loss against steps does not depend on machine load.

Per step it also records the dense-equivalent update of the off-diagonal blocks,
``||W_off(t+1) - W_off(t)||_F``, and of the diagonal blocks, for phantom and for the dense model.

    python benchmarks/param_study.py --width 1024 --ranks 2 --ghosts 16 --steps 200 \
        --variant base --variant "mult_C=4,mult_D=4" --out /tmp/study.json
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

from phantom_plugin import init
from phantom_plugin.bench.runner import teacher_batch


class SimPhantomFFN(nn.Module):
    def __init__(self, width, depth, k, p, seed, *, scale_C=1.0, scale_D=1.0, scale_L=1.0, init_kind=None):
        super().__init__()
        self.p, self.k, self.width, self.depth = p, k, width, depth
        self.L, self.C, self.D, self.b = (nn.ParameterList() for _ in range(4))
        for l in range(depth):
            blocks = init.master_blocks(seed + l, width, width, k, p)
            for r in range(p):
                self.L.append(nn.Parameter(blocks[r]["local_weight"] * scale_L))
                self.C.append(nn.Parameter(blocks[r]["compressor"] * scale_C))
                self.D.append(nn.Parameter(blocks[r]["decompressor"] * scale_D))
                self.b.append(nn.Parameter(blocks[r]["bias"]))

    def dense(self, l):
        p, k = self.p, self.k
        rows = []
        for i in range(p):
            d = self.D[l * p + i].split(k, dim=1)
            others = [j for j in range(p) if j != i]
            row = [self.L[l * p + i] if j == i else d[others.index(j)] @ self.C[l * p + j] for j in range(p)]
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0), torch.cat([self.b[l * p + i] for i in range(p)])

    def forward(self, x):
        for l in range(self.depth):
            w, b = self.dense(l)
            x = nn.functional.linear(x, w, b)
            if l < self.depth - 1:
                x = nn.functional.gelu(x)
        return x

    def groups(self):
        return {"L": list(self.L), "C": list(self.C), "D": list(self.D), "b": list(self.b)}


class DenseFFN(nn.Module):
    def __init__(self, width, depth, seed):
        super().__init__()
        self.depth = depth
        self.W = nn.ParameterList([nn.Parameter(init.dense_master(seed + l, width, width)) for l in range(depth)])
        self.b = nn.ParameterList([nn.Parameter(init.dense_bias(seed + l, width, width)) for l in range(depth)])

    def dense(self, l):
        return self.W[l], self.b[l]

    def forward(self, x):
        for l in range(self.depth):
            x = nn.functional.linear(x, self.W[l], self.b[l])
            if l < self.depth - 1:
                x = nn.functional.gelu(x)
        return x

    def groups(self):
        return {"L": list(self.W), "b": list(self.b)}


def _offdiag_mask(n, p):
    m = torch.ones(n, n, dtype=torch.bool)
    s = n // p
    for i in range(p):
        m[i * s:(i + 1) * s, i * s:(i + 1) * s] = False
    return m


def run(model, args, mult, label, measure=True):
    groups = model.groups()
    opt = torch.optim.Adam([{"params": ps, "lr": args.lr * mult.get(kind, 1.0)} for kind, ps in groups.items()],
                           lr=args.lr)
    mask = _offdiag_mask(args.width, args.ranks)
    losses, upd_off, upd_diag = [], [], []
    t0 = time.time()
    for step in range(args.steps):
        x, y = teacher_batch(step, args.batch, args.width, args.seed)
        if measure and step % args.every == 0:
            with torch.no_grad():
                before = [model.dense(l)[0].clone() for l in range(model.depth)]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if measure and step % args.every == 0:
            with torch.no_grad():
                off = diag = 0.0
                for l in range(model.depth):
                    dw = model.dense(l)[0] - before[l]
                    off += dw[mask].pow(2).sum().item()
                    diag += dw[~mask].pow(2).sum().item()
                upd_off.append(math.sqrt(off))
                upd_diag.append(math.sqrt(diag))
    return {"label": label, "losses": losses, "upd_off": upd_off, "upd_diag": upd_diag,
            "seconds": time.time() - t0}


def parse_variant(s):
    kv = dict(item.split("=") for item in s.split(",") if "=" in item)
    return s, {k: float(v) for k, v in kv.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ghosts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--dense", action="store_true", help="also train the dense (TP-equivalent) model")
    ap.add_argument("--variant", action="append", default=[],
                    help="comma list: mult_L, mult_C, mult_D, mult_b, scale_C, scale_D, scale_L")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    if args.dense:
        r = run(DenseFFN(args.width, args.depth, args.seed), args, {}, "dense")
        results.append(r)
        print(f"dense: final {sum(r['losses'][-10:]) / 10:.4f} ({r['seconds']:.0f}s)", flush=True)
    for v in args.variant:
        label, kv = parse_variant(v)
        mult = {k[5:]: x for k, x in kv.items() if k.startswith("mult_")}
        scales = {k: x for k, x in kv.items() if k.startswith("scale_")}
        model = SimPhantomFFN(args.width, args.depth, args.ghosts, args.ranks, args.seed, **scales)
        r = run(model, args, mult, label)
        results.append(r)
        print(f"{label}: final {sum(r['losses'][-10:]) / 10:.4f} ({r['seconds']:.0f}s)", flush=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f)


if __name__ == "__main__":
    main()
