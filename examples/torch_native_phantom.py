"""Phantom MLPs in PyTorch's own stack: DeviceMesh, DTensor TP, FSDP2 and torch.compile (torchtitan style).

    torchrun --nproc_per_node 4 examples/torch_native_phantom.py            # dp 2 x tp 2, CPU/gloo
    torchrun --nproc_per_node 4 examples/torch_native_phantom.py --tp 4     # dp 1 x tp 4

A small Llama built from its ``transformers`` config (no download) gets, on the ``tp`` dimension of
a 2-D mesh, PyTorch's ``ColwiseParallel`` / ``RowwiseParallel`` for attention and
``phantom_plugin.dtensor.PhantomMLPParallel`` for the MLPs, then optional activation
checkpointing, ``torch.compile(fullgraph=True)`` of each decoder layer and FSDP2 (``fully_shard``) over ``dp``.
It trains a few steps on the bytes of the Python standard library's sources, printing the loss,
then exports the dense model (``dense_state_dict``: every rank's phantom blocks gathered into the
dense weights), loads it into a plain ``LlamaForCausalLM`` and checks it gives the same logits.

On CPU the ranks use gloo and a ``"cpu"`` mesh (FSDP2 runs on gloo as is); with one GPU per rank,
NCCL and ``"cuda"``.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import transformers as tf
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from phantom_plugin.bench.lm_data import read_corpus
from phantom_plugin.dtensor import PhantomMLPParallel, dense_state_dict, parallelize_module

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:                                   # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel (phantom) size; dp = world / tp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ghost-dim", type=int, default=32, help="k, ghosts per rank and layer")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="sequences per data-parallel rank")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-fullgraph", dest="fullgraph", action="store_false",
                    help="compile with fullgraph=False (default: fullgraph=True, no graph break expected)")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per decoder layer")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % args.tp:
        raise SystemExit(f"--tp {args.tp} must divide the world size {world}")
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    mesh = init_device_mesh(device, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))

    config = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq,
                            tie_word_embeddings=False)
    torch.manual_seed(0)                              # the same dense model on every rank
    model = tf.LlamaForCausalLM(config).to(device)

    attn = "model.layers.*.self_attn."
    plan = {attn + "q_proj": ColwiseParallel(), attn + "k_proj": ColwiseParallel(),
            attn + "v_proj": ColwiseParallel(), attn + "o_proj": RowwiseParallel(),
            "model.layers.*.mlp": PhantomMLPParallel(ghost_dim=args.ghost_dim)}
    parallelize_module(model, mesh["tp"], plan)       # checks the plan first, then torch's
    for i, layer in enumerate(model.model.layers):
        if args.ac:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            layer = model.model.layers[i] = checkpoint_wrapper(layer)
        if not args.no_compile:
            layer.compile(fullgraph=args.fullgraph)
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])

    data = torch.tensor(list(read_corpus(None, 1 << 20)[0]), dtype=torch.int64)   # stdlib .py sources
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)            # the same offsets on every rank
    for step in range(args.steps):
        starts = torch.randint(0, data.numel() - args.seq, (dp * args.batch,), generator=gen)
        mine = starts[dp_rank * args.batch:(dp_rank + 1) * args.batch]   # this dp rank's sequences
        ids = torch.stack([data[s:s + args.seq] for s in mine.tolist()]).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {float(mean) / dp:.4f}", flush=True)

    # the dense export: every rank's phantom blocks gathered into the dense weights
    dense = tf.LlamaForCausalLM(config).to(device)
    dense.load_state_dict(dense_state_dict(model))
    with torch.no_grad():
        got, want = dense(input_ids=ids).logits, model(input_ids=ids).logits
    err = float((got - want).abs().max() / want.abs().max())
    if rank == 0:
        print(f"dense export: {sum(p.numel() for p in dense.parameters())} parameters, logits "
              f"relative difference {err:.2e}", flush=True)
    if err > 1e-4:
        raise SystemExit(f"rank {rank}: the dense export differs from the phantom model ({err:.2e})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
