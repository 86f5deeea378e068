"""Train a small GPT with Megatron-core: tensor-parallel MLPs versus phantom MLPs.

Same seed, same data (byte-level tokens of this Python's standard-library ``.py`` sources, a
corpus every Python ships), same TP attention; only the MLP spec differs:
``get_gpt_layer_local_spec()`` versus ``with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=k)``.
Prints loss, tokens/s, bytes sent per step per rank (every collective: megatron's counted by
``comm.intercept_torch_collectives``, the plugin's by its own, both into a ``comm.CommCounter``) and
parameters.

CPU (gloo), 2 ranks, a few minutes::

    torchrun --nproc_per_node 2 examples/megatron_gpt_phantom.py
    torchrun --nproc_per_node 2 examples/megatron_gpt_phantom.py --steps 60 --generate 48

``--generate N`` then continues a held-out prompt by ``N`` greedy tokens with the trained phantom
model (``phantom_plugin.megatron.greedy_generate``: no KV cache, runs on CPU), converts the model
to dense TP MLPs (``phantom_plugin.megatron.to_dense``, exact) and checks that the dense model
picks the same tokens on every rank.

On GPUs (NCCL, one per rank) it uses the stock spec (Transformer Engine when installed) and RoPE;
on CPU a CPU-friendly ``core_attention`` (SDPA) and learned absolute positions. The model is
``phantom-bench --task lm``'s (``phantom_plugin.bench.lm_model``), which runs the same comparison
on any text and reports the CPU time and modeled energy to a held-out loss.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

from phantom_plugin.bench.lm_model import build_gpt, unique_params
from phantom_plugin.megatron.data import stdlib_bytes


def make_batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    """``steps`` random windows ``(tokens, labels)`` of ``[batch, seq]`` from ``data`` (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (steps, batch), generator=g)
    idx = starts[..., None] + torch.arange(seq + 1)
    windows = data[idx]                                                  # [steps, batch, seq+1]
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]


def build(args, phantom: bool, device):
    """The GPT of ``phantom-bench --task lm`` (``phantom_plugin.bench.lm_model.build_gpt``): TP MLPs
    with the phantom MLPs' initialisation convention, or phantom MLPs by the spec swap."""
    return build_gpt(hidden=args.hidden, ffn_hidden=args.ffn, layers=args.layers, heads=args.heads, seq=args.seq,
                     tp=args.tp, seed=args.seed, device=device, ghost_dim=args.ghost_dim if phantom else None,
                     init=args.init)


def run(args, phantom: bool, train, evals, device) -> dict:
    from phantom_plugin import comm
    model = build(args, phantom, device)
    from phantom_plugin import param_groups
    mult = None if args.factor_lr_mult is None else {"compressor": args.factor_lr_mult,
                                                      "decompressor": args.factor_lr_mult}
    opt = torch.optim.AdamW(param_groups(model, args.lr, weight_decay=0.0, multipliers=mult), lr=args.lr)
    pos = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
    losses, timed, t0 = [], 0, None
    with comm.CommCounter() as counter, comm.intercept_torch_collectives("megatron"):
        for step, (tok, lab) in enumerate(train):
            if step == args.warmup:                       # time and count after warm-up steps
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                counter.reset()
            loss = model(tok.to(device), pos, None, labels=lab.to(device)).float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        timed = len(train) - args.warmup
        records = list(counter.records)
    model.eval()
    with torch.no_grad():
        ev = sum(model(t.to(device), pos, None, labels=l.to(device)).float().mean().item() for t, l in evals)
    mlp_tags = {"ghosts_fwd", "ghosts_bwd", "scatter_bwd", "gather_fwd", "seq_to_hidden_fwd",
                "seq_to_hidden_bwd", "hidden_to_seq_fwd", "hidden_to_seq_bwd"}
    return {"name": f"phantom k={args.ghost_dim}" if phantom else "TP",
            "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
            "eval_loss": ev / len(evals),
            "tokens_per_s": timed * args.batch * args.seq / elapsed,
            "bytes_per_step": sum(r.sent_bytes for r in records) / timed,
            "phantom_mlp_bytes_per_step": sum(r.sent_bytes for r in records if r.tag in mlp_tags) / timed,
            "params": unique_params(model), "mlp_params": unique_params(model, ".mlp."), "model": model}


def generate(args, model, prompt: torch.Tensor) -> None:
    """Greedy continuation by the phantom model and by its exact dense conversion; they must agree."""
    from phantom_plugin import comm
    from phantom_plugin.megatron import count_phantom_mlps, greedy_generate, to_dense
    if count_phantom_mlps(model) != args.layers:
        raise SystemExit(f"expected {args.layers} phantom MLPs, the model holds {count_phantom_mlps(model)}")
    phantom = greedy_generate(model, prompt, args.generate)
    to_dense(model)
    dense = greedy_generate(model, prompt, args.generate)
    same = torch.equal(phantom, dense)
    ranks = comm.all_gather(phantom, None).cpu()                          # [p, 1, s + N]
    rank_identical = all(torch.equal(ranks[0], r) for r in ranks)
    if dist.get_rank() == 0:
        text = lambda t: bytes(t.tolist()).decode("utf-8", errors="replace")  # noqa: E731
        n = prompt.shape[1]
        print(f"\nprompt:   {text(prompt[0])!r}\nphantom:  {text(phantom[0, n:])!r}\n"
              f"dense:    {text(dense[0, n:])!r}\n{args.generate} greedy tokens: dense conversion "
              f"{'identical' if same else 'DIFFERENT'}, TP ranks {'identical' if rank_identical else 'DIFFERENT'}")
    if not (same and rank_identical):
        raise SystemExit("greedy tokens differ between the phantom model, its dense conversion or the ranks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ghost-dim", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--init", choices=("spectral", "balanced"), default="spectral",
                    help="phantom MLPs' initialisation scheme (PhantomLinear's init; spectral won "
                         "docs/choosing-k.md's parametrisation study)")
    ap.add_argument("--factor-lr-mult", type=float, default=None,
                    help="lr multiplier of compressors and decompressors (default: param_groups' k-aware rule)")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="after training, continue a held-out prompt by N greedy tokens (phantom and dense)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(minutes=10))
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    args.tp = dist.get_world_size()
    from megatron.core import parallel_state
    from phantom_plugin.modeling import counts
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if not 0 <= args.generate < args.seq:
        raise SystemExit(f"--generate ({args.generate}) must be in [0, --seq) = [0, {args.seq})")
    data = stdlib_bytes(4_000_000)
    split = int(0.95 * data.numel())
    train = make_batches(data[:split], args.steps, args.batch, args.seq, args.seed)
    evals = make_batches(data[split:], 8, args.batch, args.seq, args.seed + 1)
    results = [run(args, False, train, evals, device), run(args, True, train, evals, device)]
    if dist.get_rank() == 0:
        tokens, L = args.batch * args.seq, args.layers
        tp_mlp = counts.tp_mlp_cost(args.hidden, args.ffn, p=args.tp, tokens=tokens).bytes_sent * L
        ph_mlp = counts.phantom_mlp_cost(args.hidden, args.ffn, p=args.tp, k=args.ghost_dim, tokens=tokens).bytes_sent * L
        print(f"\nGPT: {L} layers, h={args.hidden}, ffn={args.ffn}, heads={args.heads}, seq={args.seq}, "
              f"batch={args.batch}, TP={args.tp}, {args.steps} steps, corpus {data.numel():,} stdlib bytes, "
              f"{'NCCL ' + torch.cuda.get_device_name() if gpu else 'gloo CPU'}")
        # the non-MLP traffic (TP attention, vocab-parallel embedding and loss) is the same in both
        # runs, so TP's MLP bytes are its total minus the phantom run's non-MLP bytes
        ph = results[1]
        other = ph["bytes_per_step"] - ph["phantom_mlp_bytes_per_step"]
        results[0]["mlp_bytes"], ph["mlp_bytes"] = results[0]["bytes_per_step"] - other, ph["phantom_mlp_bytes_per_step"]
        print("| MLPs | first loss | train loss (last 10 steps) | held-out loss | tokens/s | "
              "MB sent/step/rank (all) | MB sent/step/rank (MLPs) | params | MLP params |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['name']} | {r['loss_first']:.3f} | {r['loss_last10']:.3f} | {r['eval_loss']:.3f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['bytes_per_step'] / 1e6:.2f} | {r['mlp_bytes'] / 1e6:.2f} | "
                  f"{r['params']:,} | {r['mlp_params']:,} |")
        print(f"cost model, MLP MB/step/rank: TP {tp_mlp / 1e6:.2f}, phantom {ph_mlp / 1e6:.2f}")
    if args.generate:
        n = min(32, args.seq - args.generate)
        generate(args, results[1]["model"], data[split:split + n].view(1, n).to(device))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
