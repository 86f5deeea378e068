"""``phantom-bench --task lm`` from arguments to results: :func:`lm_plan` checks every input and
builds both models' :class:`~.lm.LMSpec` before any rank starts; :func:`run_lm` trains both and
returns ``(runs, markdown, summary, title)`` as the other recipes (:mod:`.experiments`) do.

``--max-factor F`` (default 1: both train ``--steps``): phantom may train up to ``F`` times
``--steps`` and stops after the first evaluation at or below TP's final held-out loss.

``--match width``: both MLPs have ``ffn_hidden = 4 * width``. ``--match compute``: TP keeps
``4 * width`` and phantom gets the widest ``ffn_hidden`` whose per-rank MLP MACs do not exceed
TP's (:func:`phantom_plugin.modeling.counts.equal_compute_ffn_hidden`; ``k`` is kept).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

from ..modeling import counts
from ..shapes import divisibility_error, ghost_dim_error
from .lm import LMSpec, time_to_loss
from .lm_data import check_sizes, read_corpus
from .lm_model import VOCAB

__all__ = ["LMPlan", "lm_plan", "parse_lr_mult", "default_heads", "default_lr", "run_lm"]


@dataclasses.dataclass(frozen=True)
class LMPlan:
    """Both models' specs, the corpus, and how their MLPs were matched (``match``: JSON-ready)."""
    tp: LMSpec
    phantom: LMSpec
    corpus: bytes
    corpus_description: str
    match: dict


def parse_lr_mult(text: Optional[str]) -> Optional[tuple]:
    """``"compressor=0.5,decompressor=0.5"`` -> ``(("compressor", 0.5), ("decompressor", 0.5))``."""
    if text is None:
        return None
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        kind, eq, value = item.partition("=")
        try:
            out.append((kind.strip(), float(value)))
        except ValueError:
            eq = ""
        if not eq:
            raise ValueError(f"--lr-mult: {item!r} is not KIND=NUMBER; write e.g. --lr-mult compressor=0.5,decompressor=0.5")
    if not out:
        raise ValueError("--lr-mult is empty; write KIND=NUMBER,... or omit it")
    return tuple(out)


def _check_optimizer_options(multipliers: Optional[tuple], parametrization: Optional[str]) -> None:
    """Let :func:`phantom_plugin.param_groups` judge ``--lr-mult`` and ``--parametrization`` here,
    on a one-layer module, so a bad value fails before any rank starts."""
    import torch

    from ..optim import param_groups
    kw = {"multipliers": dict(multipliers) if multipliers else None}
    if parametrization is not None:
        kw["parametrization"] = parametrization
    try:
        param_groups(torch.nn.Linear(2, 2), 1e-3, **kw)
    except TypeError as e:
        if parametrization is not None and "parametrization" in str(e):
            raise ValueError("--parametrization: this phantom_plugin's param_groups takes no parametrization=; "
                             "update phantom_plugin or omit the flag") from e
        raise
    except ValueError as e:
        flags = "--lr-mult" + (" / --parametrization" if parametrization is not None else "")
        raise ValueError(f"{flags}: {e}") from e


def default_heads(width: int, ranks: int) -> int:
    """``width/64`` heads when that is a multiple of ``ranks`` dividing ``width``, else ``ranks``."""
    h = width // 64
    return h if h >= 1 and width % h == 0 and h % ranks == 0 else ranks


def default_lr(width: int) -> float:
    """``--lr`` of ``--task lm`` when none is given: ``1e-3 * (256/width)**2``, at most 1e-3.

    TP's best constant AdamW lr (no warmup, no clipping, batch 8 x 128 bytes, 300 steps, Vim help
    files): 1e-3 at width 256 (of 5e-4, 1e-3, 2e-3) and 2.5e-4 at width 512 (of 1.25e-4, 2.5e-4,
    5e-4, 1e-3); the rule goes through both. At other widths it is an extrapolation (below 256 it
    stays at 1e-3 rather than grow): sweep ``--lr`` for TP there. A too-large lr trains TP badly
    and makes phantom look better than it is (at width 512 and 1e-3 TP ended at 2.74 nats/byte
    against 2.17 at 2.5e-4).
    """
    return min(1e-3, 1e-3 * (256 / width) ** 2)


def lm_plan(*, width: int, depth: int, ranks: int, ghosts: int, batch: int, seq: int, steps: int,
            heads: Optional[int], eval_every: int, eval_batches: int, heldout: float, lr: float, seed: int,
            match: str, corpus: Optional[str], corpus_limit: int, energy_preset: str,
            lr_mult: Optional[str] = None, parametrization: Optional[str] = None,
            init: str = "spectral") -> LMPlan:
    """Check the inputs (``ValueError`` naming the flag and the fix) and build both specs."""
    for name, value in (("--width", width), ("--depth", depth), ("--ranks", ranks), ("--batch", batch),
                        ("--seq", seq), ("--steps", steps), ("--eval-every", eval_every),
                        ("--eval-batches", eval_batches)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    for error in (divisibility_error("--width", width, ranks, by="number of ranks (--ranks)"),
                  divisibility_error("the byte vocabulary", VOCAB, ranks, by="number of ranks (--ranks)",
                                     fix="use --ranks 1, 2, 4, 8, ... (a divisor of 256)")):
        if error:
            raise ValueError(error)
    heads = heads if heads is not None else default_heads(width, ranks)
    if heads < 1 or width % heads:
        raise ValueError(f"--heads={heads} must divide --width={width}; choose a divisor of {width}")
    error = divisibility_error("--heads", heads, ranks, by="number of ranks (--ranks)",
                               fix=f"choose --heads a multiple of {ranks} that divides --width {width}")
    if error:
        raise ValueError(error)
    ffn_tp = 4 * width
    if match == "width":
        ffn_ph = ffn_tp
    elif match == "compute":
        try:
            ffn_ph = counts.equal_compute_ffn_hidden(width, ffn_tp, p=ranks, k=ghosts)
        except ValueError as e:
            raise ValueError(f"--match compute: {e}") from e
    else:
        raise ValueError(f"--match must be width or compute, got {match!r}")
    error = ghost_dim_error(ghosts, min(width, ffn_ph), ranks, name="--ghosts", bound="--width/--ranks")
    if error:
        raise ValueError(error)
    from ..init import INIT_SCHEMES
    if init not in INIT_SCHEMES:
        raise ValueError(f"--init must be one of {list(INIT_SCHEMES)}, got {init!r}")
    multipliers = parse_lr_mult(lr_mult)
    _check_optimizer_options(multipliers, parametrization)
    data, description = read_corpus(corpus, corpus_limit)
    error = check_sizes(len(data), heldout, seq)
    if error:
        raise ValueError(error)
    common = dict(width=width, depth=depth, heads=heads, ghost_dim=ghosts, batch=batch, seq=seq, steps=steps,
                  eval_every=eval_every, eval_batches=eval_batches, heldout=heldout, lr=lr, seed=seed,
                  energy_preset=energy_preset, multipliers=multipliers, parametrization=parametrization,
                  init=init)
    tp_macs = counts.tp_mlp_cost(width, ffn_tp, p=ranks, tokens=1).macs
    ph_macs = counts.phantom_mlp_cost(width, ffn_ph, p=ranks, k=ghosts, tokens=1).macs
    info = {"kind": match, "tp_ffn_hidden": ffn_tp, "phantom_ffn_hidden": ffn_ph, "ghost_dim": ghosts,
            "mlp_macs_per_token_per_rank": {"tp": tp_macs, "phantom": ph_macs},
            "mlp_macs_ratio": ph_macs / tp_macs}
    return LMPlan(LMSpec(mode="tp", ffn_hidden=ffn_tp, **common), LMSpec(mode="phantom", ffn_hidden=ffn_ph, **common),
                  data, description, info)


def run_lm(args, plan: LMPlan):
    """Train ``plan``'s two models, one launch each (``args``: backend, threads, timeout, progress)."""
    from .launch import run_ranks
    from .lm import lm_rank
    from .report import lm_table
    from .runs import backend_for
    p = args.ranks[0]
    backend = backend_for(args, p)
    threads = args.threads or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    runs = []
    for spec in (plan.tp, plan.phantom):
        if spec.mode == "phantom" and args.max_factor > 1:   # phantom may train longer, to TP's final loss
            spec = dataclasses.replace(spec, steps=int(args.max_factor * spec.steps),
                                       target_loss=runs[0]["evals"][-1]["loss"])
        t0 = time.perf_counter()
        rec = run_ranks(lm_rank, p, spec, plan.corpus, not args.no_progress, timeout=args.timeout,
                        backend=backend, threads=threads, bind_cores=args.bind_cores)[0]
        rec.update(launch_wall_s=time.perf_counter() - t0, backend=backend, threads_per_rank=threads,
                   bind_cores=args.bind_cores, oversubscribed=backend == "gloo" and p * threads > cores,
                   corpus=plan.corpus_description, match=plan.match)
        runs.append(rec)
    summary = {"time_to_loss": time_to_loss(runs[0], runs[1]), "match": plan.match}
    title = (f"byte-level GPT, h={plan.tp.width}, L={plan.tp.depth}, p={p}, k={plan.phantom.ghost_dim}, "
             f"match {plan.match['kind']}")
    return runs, lm_table(runs[0], runs[1], summary), summary, title
