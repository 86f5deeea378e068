"""Parametrisations of phantom MLPs on text: a byte-level Megatron-core GPT, held-out loss at equal steps.

Reuses ``examples/megatron_gpt_phantom.py``'s model builder and batches (TP attention, TP or
phantom MLPs from one initialisation convention, byte tokens of the standard library's sources).
Held-out: the last 10% of the bytes. For each base lr, every variant trains the same model from
the same seed on the same batches with AdamW (no weight decay) over
``phantom_plugin.param_groups(model, lr, parametrization=..., multipliers=...)``; ``tp`` is the
TP-MLP model with a plain lr (one group). Variants: ``tp``, a parametrization name of
``phantom_plugin.optim.PARAMETRIZATIONS``, optionally followed by ``init=spectral`` (the phantom
MLPs' initialisation scheme) and ``mult_D=x`` / ``mult_C=x`` / ``mult_L=x`` (explicit multipliers
for that kind, in every layer).

CPU (gloo), 2 ranks, about 30 s per variant on a 2-core VM::

    torchrun --nproc_per_node 2 benchmarks/param_study_text.py --lr 1e-3 --lr 3e-3 \\
        --variant tp --variant balanced --variant mup --variant balanced,mult_D=8 --out /tmp/text.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import time

import torch
import torch.distributed as dist

from phantom_plugin.megatron.data import stdlib_bytes

_KINDS = {"mult_L": "local", "mult_C": "compressor", "mult_D": "decompressor"}


def _example():
    """``examples/megatron_gpt_phantom.py`` as a module (its ``build`` and ``make_batches``)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "megatron_gpt_phantom.py"
    spec = importlib.util.spec_from_file_location("megatron_gpt_phantom", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_variant(text: str) -> tuple[str, dict]:
    """``"balanced,init=spectral,mult_D=8"`` -> ``("balanced", "spectral", {"decompressor": 8.0})``."""
    name, *rest = text.split(",")
    mults, scheme = {}, "balanced"
    for item in rest:
        key, _, value = item.partition("=")
        if key == "init":
            scheme = value
        elif key in _KINDS:
            mults[_KINDS[key]] = float(value)
        else:
            raise SystemExit(f"--variant {text!r}: {key!r} is not init or one of {sorted(_KINDS)}")
    return name, scheme, mults


def train(ex, args, variant: str, lr: float, train_batches, eval_batches) -> dict:
    from phantom_plugin import param_groups
    name, scheme, mults = parse_variant(variant)
    phantom = name != "tp"
    model = ex.build(argparse.Namespace(**{**vars(args), "init": scheme}), phantom, torch.device("cpu"))
    groups = (param_groups(model, lr, weight_decay=0.0, parametrization=name, multipliers=mults or None)
              if phantom else model.parameters())
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    pos = torch.arange(args.seq).expand(args.batch, args.seq)
    losses, t0 = [], time.perf_counter()
    for tok, lab in train_batches:
        loss = model(tok, pos, None, labels=lab).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        held_out = sum(model(t, pos, None, labels=l).float().mean().item() for t, l in eval_batches) / len(eval_batches)
    return {"variant": variant, "lr": lr, "held_out": held_out, "train_last10": sum(losses[-10:]) / len(losses[-10:]),
            "losses": losses, "seconds": time.perf_counter() - t0,
            "lr_mults": sorted({(g["kind"], round(g["lr_mult"], 4)) for g in opt.param_groups if "kind" in g})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ghost-dim", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bytes", type=int, default=2_000_000)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--lr", type=float, action="append", default=[])
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=20))
    args.tp = dist.get_world_size()
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    ex = _example()
    data = stdlib_bytes(args.bytes)
    split = int(0.9 * data.numel())                                      # held-out: the last 10%
    train_batches = ex.make_batches(data[:split], args.steps, args.batch, args.seq, args.seed)
    eval_batches = ex.make_batches(data[split:], args.eval_batches, args.batch, args.seq, args.seed + 1)
    results = []
    for lr in args.lr or [2e-3]:
        for variant in args.variant or ["tp", "balanced", "mup"]:
            r = train(ex, args, variant, lr, train_batches, eval_batches)
            results.append(r)
            if dist.get_rank() == 0:
                print(f"lr {lr:g} {variant}: held-out {r['held_out']:.4f} train(last10) {r['train_last10']:.4f} "
                      f"({r['seconds']:.0f}s)", flush=True)
                with open(args.out, "w") as f:                           # after every run: partial results
                    json.dump({"args": dict(vars(args)), "results": results}, f)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
