"""``phantom-bench``: TP (megatron-core layers) and phantom side by side, same launcher, data,
seed and steps, over a grid; writes ``results.json``, ``results.md`` and PNG plots into ``--out``.

One point::

    phantom-bench --width 2048 --depth 4 --ranks 2 --ghosts 32 --batch 256 --steps 200 --out DIR

Comma-separated values make a grid (``--ranks 2,4 --ghosts 16,32``). Ranks are started here
(gloo on CPU; NCCL, one GPU per rank, when enough GPUs are visible). ``--recipe e1`` / ``e2`` run
the paper's two experiments (:mod:`phantom_plugin.bench.experiments`); ``--probe`` adds the GEMM-rate and
hidden-communication measurements (:mod:`phantom_plugin.bench.probe`). ``--inference`` measures forward passes only
(:mod:`phantom_plugin.bench.inference`): a throughput phase at ``--batch`` and a latency phase at batch 1, ``--steps``
forward passes each.

``--task lm`` trains a byte-level GPT (megatron-core ``GPTModel``, TP attention) on text with TP
MLPs and with phantom MLPs and reports the CPU-seconds and modeled energy each needs to reach TP's
final held-out loss (:mod:`phantom_plugin.bench.lm`)::

    phantom-bench --task lm --corpus DOCS/ --width 256 --depth 4 --ranks 2 --steps 300 --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

from ..dtypes import DTYPES
from ..modeling.devices import DEVICES

__all__ = ["main", "parse_args"]


def _ints(s: str) -> list[int]:
    return [int(v) for v in str(s).split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="phantom-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="ffn", choices=["ffn", "lm"],
                    help="ffn: the teacher FFN (default); lm: a byte-level GPT on text, time to a held-out loss")
    ap.add_argument("--width", type=_ints, default=None, help="n, comma-separated for a grid (default 1024; lm: 256)")
    ap.add_argument("--depth", type=_ints, default=[4], help="layers")
    ap.add_argument("--ranks", type=_ints, default=[2], help="p (TP ranks; E2: phantom gets p/2)")
    ap.add_argument("--ghosts", type=_ints, default=None,
                    help="k, ghost neurons per rank (default 16; lm: (width/ranks)/8, phantom-plan's k for a loss "
                         "reached early)")
    ap.add_argument("--batch", type=_ints, default=None, help="samples per step (default 256; lm: sequences, 8)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 100, lm 300; E2: TP's)")
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the timings")
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate (default 1e-3; --task lm: 1e-3 * (256/width)**2 capped at 1e-3, TP's best "
                         "at widths 256 and 512 on text)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--modes", default="tp,phantom", help="tp, phantom or both")
    ap.add_argument("--recipe", default="grid", choices=["grid", "e1", "e2"],
                    help="grid: every point; e1: phantom vs TP at equal n and p, with time to a target "
                         "loss; e2: phantom on p/2 ranks trained to TP-on-p's final loss")
    ap.add_argument("--max-factor", type=float, default=None,
                    help="E2 (default 4) and --task lm (default 1): phantom may run up to this many times TP's "
                         "steps to reach its (lm: held-out) loss")
    ap.add_argument("--inference", action="store_true",
                    help="forward only (torch.inference_mode): throughput at --batch and latency at batch 1; "
                         "--steps forward passes per phase")
    ap.add_argument("--probe", action="store_true",
                    help="also measure the dense GEMM rate and the hidden ghost communication")
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads per rank (0: cores/ranks)")
    ap.add_argument("--bind-cores", action="store_true",
                    help="run each rank's compute on cores of its own (ranks x threads <= usable cores; "
                         "steadier CPU timings)")
    ap.add_argument("--energy-preset", default="h100-sxm", choices=sorted(DEVICES),
                    help="device whose datasheet figures price the modeled energy (pJ/FLOP from its max "
                         "board power over its peak BF16 rate, pJ/byte an assumption; labelled modeled)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--out", default="bench_out", help="output folder")
    ap.add_argument("--no-progress", action="store_true")
    lm = ap.add_argument_group("--task lm")
    lm.add_argument("--corpus", default=None, metavar="PATH",
                    help="a text file or a folder of text files (default: the standard library's .py sources)")
    lm.add_argument("--corpus-limit", type=int, default=None, metavar="BYTES",
                    help="read at most this many bytes of the corpus (default 16000000)")
    lm.add_argument("--heldout", type=float, default=None, help="share of the corpus, at its end, held out (default 0.1)")
    lm.add_argument("--seq", type=int, default=None, help="tokens (bytes) per sequence (default 128)")
    lm.add_argument("--heads", type=int, default=None, help="attention heads (default width/64, or --ranks)")
    lm.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default 10)")
    lm.add_argument("--eval-batches", type=int, default=None, help="held-out batches per evaluation (default 8)")
    lm.add_argument("--match", default=None, choices=["width", "compute"],
                    help="width: both MLPs 4*width wide (default); compute: phantom's MLP widened until its "
                         "per-rank MACs equal TP's")
    lm.add_argument("--parametrization", default=None, metavar="NAME",
                    help="forwarded to phantom_plugin.param_groups(parametrization=NAME) (default: its default)")
    lm.add_argument("--init", default=None, metavar="SCHEME",
                    help="phantom MLPs' initialisation (phantom_plugin.init.INIT_SCHEMES; default spectral, "
                         "the parametrisation study's winner)")
    lm.add_argument("--lr-mult", default=None, metavar="KIND=X,...",
                    help="lr multipliers per parameter kind, forwarded to param_groups(multipliers=...)")
    args = ap.parse_args(argv)
    if args.task == "lm":
        _lm_args(ap, args)
        return args
    lm_only = [f"--{n.replace('_', '-')}" for n in _LM_DEFAULTS if getattr(args, n) is not None]
    if lm_only:
        ap.error(f"{', '.join(lm_only)} apply to --task lm; add --task lm or drop them")
    args.width = args.width or [1024]
    args.max_factor = 4.0 if args.max_factor is None else args.max_factor
    args.ghosts = args.ghosts or [16]
    args.batch = args.batch or [256]
    args.steps = 100 if args.steps is None else args.steps
    args.lr = 1e-3 if args.lr is None else args.lr
    if args.inference and args.recipe != "grid":
        ap.error(f"--inference runs the grid only (got --recipe {args.recipe}): time to a loss needs training")
    if args.inference and args.probe:
        ap.error("--probe measures training steps; drop it with --inference")
    if args.bind_cores:
        from ..bench.launch import bound_cores, default_threads
        for p in args.ranks:
            try:
                bound_cores(p, args.threads or default_threads(p))
            except ValueError as e:
                ap.error(f"--bind-cores with --ranks {p}: {e}")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in ("tp", "phantom")]
    if bad:
        ap.error(f"--modes: unknown {bad}; use tp and/or phantom")
    return args


_LM_DEFAULTS = {"corpus": None, "corpus_limit": 16_000_000, "heldout": 0.1, "seq": 128, "heads": None,
                "eval_every": 10, "eval_batches": 8, "match": "width", "parametrization": None, "lr_mult": None,
                "init": "spectral"}


def _lm_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Defaults and checks of ``--task lm``; the corpus is read and every input checked here, before
    any rank starts (``args.lm_plan``)."""
    from ..bench.lm_recipe import default_lr, lm_plan
    from .plan import k_time_to_loss_hint
    not_lm = [flag for flag, bad in (("--inference", args.inference), ("--probe", args.probe),
                                      ("--recipe", args.recipe != "grid"), ("--modes", args.modes != "tp,phantom"),
                                      ("--dtype", args.dtype != "fp32")) if bad]
    if not_lm:
        ap.error(f"{', '.join(not_lm)} do not apply to --task lm (it trains TP and phantom in fp32); drop them")
    for name in ("width", "depth", "ranks", "ghosts", "batch"):
        value = getattr(args, name)
        if value is not None and len(value) != 1:
            ap.error(f"--task lm runs one point: give one --{name}, got {value}")
    for name, default in _LM_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    width, p = (args.width or [256])[0], args.ranks[0]
    args.width = [width]
    args.ghosts = args.ghosts or [k_time_to_loss_hint(width, p)["early_loss"] if p > 0 else 1]
    args.batch = args.batch or [8]
    args.steps = 300 if args.steps is None else args.steps
    args.lr = default_lr(width) if args.lr is None else args.lr
    args.max_factor = 1.0 if args.max_factor is None else args.max_factor
    if not args.max_factor >= 1:
        ap.error(f"--max-factor must be >= 1 (phantom trains at least --steps), got {args.max_factor}")
    try:
        args.lm_plan = lm_plan(width=width, depth=args.depth[0], ranks=p, ghosts=args.ghosts[0],
                               batch=args.batch[0], seq=args.seq, steps=args.steps, heads=args.heads,
                               eval_every=args.eval_every, eval_batches=args.eval_batches, heldout=args.heldout,
                               lr=args.lr, seed=args.seed, match=args.match, corpus=args.corpus,
                               corpus_limit=args.corpus_limit, energy_preset=args.energy_preset,
                               lr_mult=args.lr_mult, parametrization=args.parametrization,
                               init=args.init)
    except ValueError as e:
        ap.error(str(e))
    if args.bind_cores:
        from ..bench.launch import bound_cores
        try:
            bound_cores(p, args.threads or 1)
        except ValueError as e:
            ap.error(f"--bind-cores with --ranks {p}: {e}")


def write_outputs(out: str, runs: list[dict], markdown: str, summary: dict, title: str) -> list[str]:
    from ..bench.plots import write_inference_plots, write_lm_plots, write_plots
    os.makedirs(out, exist_ok=True)
    doc = {"command": "phantom-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "created": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": runs[0]["machine"] if runs else None, "summary": summary, "runs": runs}
    if "time_to_loss" in summary:
        doc = {**doc, "time_to_loss": summary["time_to_loss"]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown + "\n")
    plots = (write_lm_plots if runs and runs[0].get("task") == "lm" else
             write_inference_plots if runs and "phase" in runs[0] else write_plots)
    return [os.path.join(out, "results.json"), os.path.join(out, "results.md")] + plots(runs, out, title)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.task == "lm":
        from ..bench.lm_recipe import run_lm
        runs, markdown, summary, title = run_lm(args, args.lm_plan)
    else:
        from ..bench import experiments
        recipe = experiments.inference if args.inference else experiments.RECIPES[args.recipe]
        runs, markdown, summary, title = recipe(args)
    paths = write_outputs(args.out, runs, markdown, summary, title)
    print(markdown)
    print("\nwrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
