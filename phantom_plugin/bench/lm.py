"""``phantom-bench --task lm``: a byte-level GPT trained on text with TP MLPs and with phantom MLPs,
compared by the CPU time and modeled energy each needs to reach the same held-out loss.

Both models: megatron-core ``GPTModel`` with TP attention (:mod:`.lm_model`), the same seed, the
same training windows in the same order and the same held-out windows (:mod:`.lm_data`), the same
optimizer (AdamW on :func:`phantom_plugin.param_groups`), each started by
:func:`.launch.run_ranks` (gloo CPU ranks; NCCL, one GPU per rank, when enough are visible).

Recorded per step on every rank, rank 0 reporting:

* ``losses``: training loss; ``evals``: held-out loss every ``eval_every`` steps (and before the
  first step and after the last), as ``{"step": steps trained, "loss"}``;
* ``step_times_s``: wall seconds of forward + backward + optimizer step (device synchronized);
* ``step_cpu_s``: **CPU-seconds**, the sum over ranks of the process CPU time (user + sys, every
  thread: ``time.process_time``) of the training step only; data, evaluation and start-up are
  excluded;
* ``step_bytes_sent``: bytes this rank sent in the step (every collective: the plugin's, and
  megatron's through :func:`phantom_plugin.comm.intercept_torch_collectives`);
* ``step_energy_j_modeled``: 2 x :func:`.lm_model.gpt_step_macs` FLOPs and the step's bytes, per
  rank, priced on a device of :data:`phantom_plugin.modeling.devices.DEVICES` and times the ranks:
  **modeled**, never measured.

:func:`time_to_loss` turns two records into the ``"time_to_loss"`` summary of ``results.json``.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .. import comm
from ..modeling import energy_model
from .lm_data import heldout_batches, split_heldout, train_batch
from .workload import machine_description, quiet_third_party, sync

__all__ = ["LMSpec", "lm_rank", "time_to_loss", "reached"]

# megatron-core warnings that say nothing about this run: no apex on CPU machines (torch's norm is
# used), and a TransformerConfig default it deprecates itself
_NOISE = ("Apex is not installed", "full scope is deprecated")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMSpec:
    """One model's run. ``mode``: ``"tp"`` or ``"phantom"``; ``ffn_hidden``: this model's MLP inner
    width; ``ghost_dim``: phantom's ``k``; ``multipliers``/``parametrization``: forwarded to
    :func:`phantom_plugin.param_groups` (``parametrization`` only when not ``None``);
    ``target_loss``: stop after the first evaluation whose held-out loss is at or below it
    (``steps`` is then the limit)."""
    mode: str
    width: int
    ffn_hidden: int
    depth: int
    heads: int
    ghost_dim: int
    batch: int
    seq: int
    steps: int
    eval_every: int
    eval_batches: int
    heldout: float
    lr: float
    seed: int
    energy_preset: str
    multipliers: Optional[tuple] = None        # ((kind, value), ...)
    parametrization: Optional[str] = None
    init: str = "spectral"                    # phantom's initialisation (phantom_plugin.init.INIT_SCHEMES)
    target_loss: Optional[float] = None        # stop after the first evaluation at or below it


def _optimizer(model, spec: LMSpec) -> torch.optim.Optimizer:
    from ..optim import param_groups
    kw = {"weight_decay": 0.0, "multipliers": dict(spec.multipliers) if spec.multipliers else None}
    if spec.parametrization is not None:
        kw["parametrization"] = spec.parametrization
    groups = param_groups(model, spec.lr, **kw)
    try:
        return torch.optim.AdamW(groups, lr=spec.lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=spec.lr)


@torch.no_grad()
def _evaluate(model, batches, pos, device) -> float:
    model.eval()
    loss = sum(model(t.to(device), pos, None, labels=l.to(device)).float().mean().item() for t, l in batches)
    model.train()
    return loss / len(batches)


def lm_rank(rank: int, world_size: int, spec: LMSpec, corpus: bytes, progress: bool = True) -> Optional[dict]:
    """Train ``spec`` on the default group (initialized by the launcher); rank 0 returns the record."""
    quiet_third_party()
    for text in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{text}")
    from megatron.core import parallel_state

    from .lm_model import build_gpt, gpt_step_macs, unique_params
    group = dist.group.WORLD
    device = comm.collective_device(group)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        train, held = split_heldout(corpus, spec.heldout)
        evals_data = heldout_batches(held, spec.eval_batches, spec.batch, spec.seq)
        model = build_gpt(hidden=spec.width, ffn_hidden=spec.ffn_hidden, layers=spec.depth, heads=spec.heads,
                          seq=spec.seq, tp=world_size, seed=spec.seed, device=device,
                          ghost_dim=spec.ghost_dim if spec.mode == "phantom" else None, init=spec.init)
        opt = _optimizer(model, spec)
        pos = torch.arange(spec.seq, device=device).expand(spec.batch, spec.seq)
        losses, times, cpu, sent, evals = [], [], [], [], []
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=spec.steps, desc=f"lm {spec.mode:>7} p={world_size} h={spec.width}", leave=False)
        with comm.intercept_torch_collectives("megatron"):
            evals.append({"step": 0, "loss": _evaluate(model, evals_data, pos, device)})
            for step in range(spec.steps):
                tok, lab = train_batch(train, step, spec.batch, spec.seq, spec.seed)
                tok, lab = tok.to(device), lab.to(device)
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                with comm.CommCounter() as counter:
                    loss = model(tok, pos, None, labels=lab).float().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sync(device)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                sent.append(counter.sent_bytes)
                losses.append(loss.item())
                done = False
                if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
                    evals.append({"step": step + 1, "loss": _evaluate(model, evals_data, pos, device)})
                    done = spec.target_loss is not None and _all_agree(evals[-1]["loss"] <= spec.target_loss,
                                                                       group, device)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"loss {losses[-1]:.3f} held-out {evals[-1]['loss']:.3f}")
                if done:
                    break
        if bar is not None:
            bar.close()
        cpu_sum = torch.tensor(cpu, dtype=torch.float64, device=device)
        dist.all_reduce(cpu_sum, group=group)                      # CPU-seconds of all ranks, per step
        if rank != 0:
            return None
        macs = gpt_step_macs(hidden=spec.width, ffn_hidden=spec.ffn_hidden, layers=spec.depth, seq=spec.seq,
                             batch=spec.batch, tp=world_size,
                             ghost_dim=spec.ghost_dim if spec.mode == "phantom" else None)
        energy = [energy_model.modeled_energy_j(2 * macs["total"], b, spec.energy_preset) * world_size for b in sent]
        return {**dataclasses.asdict(spec), "task": "lm", "world_size": world_size, "steps_run": len(losses),
                "losses": losses,
                "evals": evals, "step_times_s": times, "step_cpu_s": cpu_sum.tolist(), "step_bytes_sent": sent,
                "step_energy_j_modeled": energy, "macs_per_step": macs["total"], "macs_by_part": macs,
                "params": unique_params(model), "mlp_params": unique_params(model, ".mlp."),
                "energy_model": f"modeled, all {world_size} ranks, {energy_model.describe(spec.energy_preset)}; "
                                "FLOPs = 2 x modeled MACs (MLPs, attention, output layer), bytes as sent",
                "machine": machine_description(device)}
    finally:
        parallel_state.destroy_model_parallel()


def _all_agree(flag: bool, group, device) -> bool:
    """True when ``flag`` is on every rank (after an evaluation; not counted as model traffic)."""
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return int(t.item()) == 0


def reached(record: dict, target: float) -> dict:
    """The first evaluation of ``record`` whose held-out loss is ``<= target``: ``{"step", "cpu_s",
    "wall_s", "energy_j"}`` (sums over the steps trained by then), all ``None`` if none is."""
    for e in record["evals"]:
        if e["loss"] <= target:
            n = e["step"]
            return {"step": n, "cpu_s": sum(record["step_cpu_s"][:n]), "wall_s": sum(record["step_times_s"][:n]),
                    "energy_j": sum(record["step_energy_j_modeled"][:n])}
    return {"step": None, "cpu_s": None, "wall_s": None, "energy_j": None}


def time_to_loss(tp: dict, phantom: dict) -> dict:
    """``{"target_loss", "tp", "phantom", "cpu_s_ratio", "energy_ratio"}``: the target is TP's final
    held-out loss; each side is :func:`reached`; the ratios are phantom / TP (``None`` when phantom
    never reaches the target). ``energy_j`` is modeled."""
    target = tp["evals"][-1]["loss"]
    a, b = reached(tp, target), reached(phantom, target)
    ok = b["step"] is not None and a["step"] is not None
    return {"target_loss": target, "tp": a, "phantom": b,
            "cpu_s_ratio": b["cpu_s"] / a["cpu_s"] if ok and a["cpu_s"] else None,
            "energy_ratio": b["energy_j"] / a["energy_j"] if ok and a["energy_j"] else None,
            "energy": "modeled"}
