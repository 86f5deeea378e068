"""Single-process study of phantom parametrisations on the teacher FFN task.

Simulates a ``PhantomFFN`` of ``p`` ranks in one process by assembling each layer's exact dense
equivalent ``W = [L_i on the diagonal, D_ij C_j off it]`` from trainable blocks (the same function
and gradients as the distributed op, which ``tests/test_layers.py`` checks against float64), and a
dense (TP-equivalent) FFN from ``init.dense_master``. Both train on ``runner.teacher_batch`` with
Adam; per-kind parameter groups come from :func:`phantom_plugin.optim.param_groups`-style
multipliers given on the command line. Loss against steps does not depend on machine load.

Per step it also records the dense-equivalent update of the off-diagonal blocks,
``||W_off(t+1) - W_off(t)||_F``, and of the diagonal blocks, for phantom and for the dense model.

Warm start (``--warm S0``, repeatable): the dense model is trained ``S0`` steps, each layer is
converted to phantom by the plugin's own factorisation (:func:`phantom_plugin.blocks.blocks_from_dense`,
what ``PhantomLinear.from_dense`` / ``convert_modules(init="dense")`` compute: ``L_i = W[i,i]``,
rank-``k`` truncated SVD of each block column's off-diagonal blocks), and training carries on as
phantom from step ``S0`` on the same batches with a **fresh** Adam state (the dense moments are
not carried over). Its losses are the dense model's for steps ``< S0``, then phantom's. The
variant ``defaults`` uses ``param_groups``' ``"balanced"`` multipliers (``factor_lr_mult`` for C and D).

Parametrisations (``docs/choosing-k.md``): a variant may start with a name of
``phantom_plugin.optim.PARAMETRIZATIONS`` (its lr multipliers, ``optim.layer_multipliers``), take
``init=spectral`` (``init.init_scales``), ``mult_X``/``scale_X`` overrides on top, and
``guide=a0``: a dense guide (Wei et al. 2024), ``a W_g + (1 - a) W_phantom`` per layer with a
trainable dense ``W_g`` and ``a`` decaying linearly from ``a0`` to 0 over the first half.

    python benchmarks/param_study.py --width 512 --ghosts 8 --steps 300 --dense --variant balanced \
        --variant mup,init=spectral --variant balanced,mult_D=4 --variant balanced,guide=1 --out /tmp/p.json

    python benchmarks/param_study.py --width 1024 --ranks 2 --ghosts 16 --steps 200 \
        --variant base --variant "mult_C=4,mult_D=4" --out /tmp/study.json
    python benchmarks/param_study.py --width 1024 --ghosts 128 --steps 300 --variant defaults \
        --warm 10 --warm 25 --warm 50 --out /tmp/warm.json
"""
from __future__ import annotations

import argparse
import os
import copy
import json
import math
import time

import torch
from torch import nn

from phantom_plugin import blocks as phantom_blocks
from phantom_plugin import init
from phantom_plugin.optim import PARAMETRIZATIONS, factor_lr_mult, layer_multipliers
from phantom_plugin.bench.workload import teacher_batch


class SimPhantomFFN(nn.Module):
    def __init__(self, width, depth, k, p, seed, *, scale_C=1.0, scale_D=1.0, scale_L=1.0, init_kind=None,
                 layer_blocks=None, dtype=torch.float32, guide=0.0):
        """``layer_blocks[l]``: every rank's blocks of layer ``l`` (``init.master_blocks`` layout);
        default: the seeded initialisation of ``phantom_plugin.init``.

        ``guide = a0 > 0``: a dense guide (Wei et al. 2024): each layer's weight is
        ``a W_g + (1 - a) W_phantom`` with a trainable dense ``W_g [n, n]`` (from
        ``init.dense_master``, the dense model's init) and ``a`` set by :meth:`set_guide`
        (the study decays it linearly from ``a0`` to 0 over the first half of training)."""
        super().__init__()
        self.p, self.k, self.width, self.depth = p, k, width, depth
        self.guide0, self.alpha = guide, guide
        self.G = nn.ParameterList()
        if guide:
            self.G.extend(nn.Parameter(init.dense_master(init.derive_seed(seed, l), width, width).to(dtype))
                          for l in range(depth))
        self.L, self.C, self.D, self.b = (nn.ParameterList() for _ in range(4))
        for l in range(depth):
            blocks = (layer_blocks[l] if layer_blocks is not None
                      else init.master_blocks(init.derive_seed(seed, l), width, width, k, p))
            blocks = [{key: t.to(dtype) for key, t in b.items()} for b in blocks]
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

    def set_guide(self, step, steps):
        """``a(step)``: ``a0`` decaying linearly to 0 at ``steps / 2``, then 0."""
        self.alpha = self.guide0 * max(0.0, 1.0 - step / (steps / 2)) if self.guide0 else 0.0

    def forward(self, x):
        for l in range(self.depth):
            w, b = self.dense(l)
            if self.alpha > 0:
                w = self.alpha * self.G[l] + (1 - self.alpha) * w
            x = nn.functional.linear(x, w, b)
            if l < self.depth - 1:
                x = nn.functional.gelu(x)
        return x

    def groups(self):
        out = {"L": list(self.L), "C": list(self.C), "D": list(self.D), "b": list(self.b)}
        if len(self.G):
            out["G"] = list(self.G)
        return out


class DenseFFN(nn.Module):
    def __init__(self, width, depth, seed, dtype=torch.float32):
        super().__init__()
        self.depth = depth
        seeds = [init.derive_seed(seed, l) for l in range(depth)]        # as PhantomFFN's layers
        self.W = nn.ParameterList([nn.Parameter(init.dense_master(s, width, width).to(dtype)) for s in seeds])
        self.b = nn.ParameterList([nn.Parameter(init.dense_bias(s, width, width).to(dtype)) for s in seeds])

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


def to_phantom(dense, k, p):
    """The dense model's phantom equivalent at ``k``, as ``from_dense`` computes it (truncated SVD)."""
    width = dense.W[0].shape[1]
    layer_blocks = [phantom_blocks.blocks_from_dense(dense.W[l].detach(), dense.b[l].detach(), p, k)
                    for l in range(dense.depth)]
    return SimPhantomFFN(width, dense.depth, k, p, 0, layer_blocks=layer_blocks, dtype=dense.W[0].dtype)


def run(model, args, mult, label, measure=True, start=0, snapshots=(), snapshot_to=None, warmup=0):
    """Adam from step ``start`` to ``args.steps`` (fresh state; with ``warmup``, every group's lr
    ramps linearly over its first ``warmup`` steps); after ``s`` steps for ``s`` in ``snapshots``,
    a copy of the model goes to ``snapshot_to[s]``."""
    groups = model.groups()
    opt = torch.optim.Adam([{"params": ps, "lr": args.lr * mult.get(kind, 1.0)} for kind, ps in groups.items()],
                           lr=args.lr)
    base_lr = [g["lr"] for g in opt.param_groups]
    mask = _offdiag_mask(args.width, args.ranks)
    losses, upd_off, upd_diag = [], [], []
    dtype = next(model.parameters()).dtype
    t0 = time.time()
    for step in range(start, args.steps):
        if hasattr(model, "set_guide"):
            model.set_guide(step, args.steps)
        x, y = teacher_batch(step, args.batch, args.width, args.seed, dtype=dtype)
        if warmup:
            for g, lr in zip(opt.param_groups, base_lr):
                g["lr"] = lr * min(1.0, (step - start + 1) / warmup)
        if measure and step % args.every == 0:
            with torch.no_grad():
                before = [model.dense(l)[0].clone() for l in range(model.depth)]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step + 1 in snapshots:
            snapshot_to[step + 1] = copy.deepcopy(model)
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
    """``"[parametrization,][init=spectral,][guide=a0,]mult_X=..,scale_X=.."``: label, numbers, words."""
    items = [item for item in s.split(",") if item]
    kv = dict(item.split("=") for item in items if "=" in item)
    words = {k: v for k, v in kv.items() if k == "init"}
    words["parametrization"] = next((item for item in items if "=" not in item), None)
    return s, {k: float(v) for k, v in kv.items() if k != "init"}, words


_KIND = {"local": "L", "compressor": "C", "decompressor": "D"}


def variant_mults(kv, words, k, width, p):
    """Per-kind lr multipliers of a variant: its parametrization's (``optim.layer_multipliers``;
    ``defaults`` is ``balanced``), then any ``mult_X`` on top, which replaces it."""
    mult = {}
    name = words.get("parametrization")
    if name == "defaults":
        mult = {"C": factor_lr_mult(k, width // p), "D": factor_lr_mult(k, width // p)}
    elif name in PARAMETRIZATIONS:
        mult = {_KIND[kind]: x for kind, x in layer_multipliers(name, width, k, p).items()}
    elif name not in (None, "base"):
        raise SystemExit(f"variant: unknown parametrization {name!r}; one of {list(PARAMETRIZATIONS)}")
    mult.update({key[5:]: x for key, x in kv.items() if key.startswith("mult_")})
    return mult


def variant_scales(kv, words, k, width, p):
    """Init scales of a variant: ``init=spectral`` (``init.init_scales``), then ``scale_X`` on top."""
    scales = {}
    if "init" in words:
        got = init.init_scales(words["init"], width, width, k, p)
        scales = {"scale_L": got["local_weight"], "scale_C": got["compressor"], "scale_D": got["decompressor"]}
    scales.update({key: x for key, x in kv.items() if key.startswith("scale_")})
    return scales


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
                    help="comma list: a parametrization (balanced, mup, mup-decompressor; 'defaults' = "
                         "balanced), init=spectral, guide=a0 (dense guide), mult_L, mult_C, mult_D, mult_b, "
                         "mult_G, scale_C, scale_D, scale_L")
    ap.add_argument("--warm", type=int, action="append", default=[],
                    help="also run each variant warm-started from the dense model after this many steps")
    ap.add_argument("--no-cold", action="store_true", help="only the warm-started runs of each variant")
    ap.add_argument("--warmup", type=int, default=0,
                    help="warm starts: ramp the phantom phase's lr linearly over this many steps")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if any(not 0 < s < args.steps for s in args.warm):
        ap.error(f"--warm must be between 1 and --steps - 1 = {args.steps - 1}")
    for v in args.variant if args.warm else ():
        if "scale_" in v or "init=" in v or "guide=" in v:
            ap.error(f"variant {v!r}: init scales do not apply to a warm start (its init is the SVD)")
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "1")))
    torch.manual_seed(0)
    results, snaps, dense_losses = [], {}, []
    if args.dense or args.warm:
        dense_args = argparse.Namespace(**dict(vars(args), steps=args.steps if args.dense else max(args.warm)))
        r = run(DenseFFN(args.width, args.depth, args.seed), dense_args, {}, "dense",
                snapshots=set(args.warm), snapshot_to=snaps)
        dense_losses = r["losses"]
        if args.dense:
            results.append(r)
        print(f"dense: final {sum(r['losses'][-10:]) / 10:.4f} ({r['seconds']:.0f}s)", flush=True)
    for v in args.variant:
        label, kv, words = parse_variant(v)
        mult = variant_mults(kv, words, args.ghosts, args.width, args.ranks)
        scales = variant_scales(kv, words, args.ghosts, args.width, args.ranks)
        runs = [] if args.no_cold else [(0, label, SimPhantomFFN(args.width, args.depth, args.ghosts,
                                                                  args.ranks, args.seed, guide=kv.get("guide", 0.0),
                                                                  **scales))]
        wu = f" wu{args.warmup}" if args.warmup else ""
        runs += [(s0, f"{label} warm{s0}{wu}", to_phantom(snaps[s0], args.ghosts, args.ranks)) for s0 in args.warm]
        for s0, name, model in runs:
            r = run(model, args, mult, name, start=s0, warmup=args.warmup if s0 else 0)
            if s0:
                r.update(losses=dense_losses[:s0] + r["losses"], warm_steps=s0, variant=label,
                         warmup=args.warmup)
            results.append(r)
            print(f"{name}: final {sum(r['losses'][-10:]) / 10:.4f} ({r['seconds']:.0f}s)", flush=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f)


if __name__ == "__main__":
    main()
