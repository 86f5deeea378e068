"""Phantom MLPs inside a DeepSpeed pipeline: pipe x model(phantom) x data.

    deepspeed --num_gpus 4 examples/train_pipe_deepspeed.py --deepspeed --deepspeed_config ds_configs/phantom_pipe.json

With ``"size": 2`` in the config and ``--stages 2`` (default) this runs pipe=2 x model=2 on 4
ranks. The ``PipelineModule`` is built as usual, with the topology from
``phantom_plugin.deepspeed.phantom_topology`` (model axis = phantom group, varying fastest);
``phantom_plugin.deepspeed.initialize`` then converts the ``mlp`` layers of each stage, turns off
DeepSpeed's partitioned stage-boundary activations (which would corrupt phantom-sharded ones)
and fixes the grad-norm accounting of replicated parameters on later stages.
"""
from __future__ import annotations

import argparse
import json
import time

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from torch import nn

from phantom_plugin import comm
from phantom_plugin.deepspeed import initialize, phantom_topology


class Block(nn.Module):
    """Pre-norm residual MLP; ``mlp`` is a ``Sequential`` of ``Linear`` and ``GELU``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--log_every", type=int, default=5)
    ap = deepspeed.add_config_arguments(ap)
    args = ap.parse_args()

    d_in = d_out = 32
    deepspeed.init_distributed()                       # a PipelineModule needs process groups
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    topology = phantom_topology(config, num_stages=args.stages)   # validates phantom_parallel first
    torch.manual_seed(0)                               # identical dense layers on every rank
    layers = ([nn.Linear(d_in, args.width)] + [Block(args.width, args.hidden) for _ in range(args.depth)]
              + [nn.Linear(args.width, d_out)])
    teacher = nn.Sequential(nn.Linear(d_in, 64), nn.Tanh(), nn.Linear(64, d_out)).requires_grad_(False)
    model = PipelineModule(layers=layers, topology=topology, partition_method="uniform",
                           loss_fn=nn.functional.mse_loss)
    args.deepspeed_config = None                       # the config goes in as a dict
    engine, _, _, _ = initialize(args=args, model=model, config=config,
                                 model_parameters=[p for p in model.parameters() if p.requires_grad])

    grid = model.mpu()
    gen = torch.Generator().manual_seed(1000 + grid.get_data_parallel_rank())
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()

    def batches():
        while True:
            x = torch.randn(micro, d_in, generator=gen)
            yield x, teacher(x)

    data = batches()
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"world={dist.get_world_size()} pipe={grid.get_pipe_parallel_world_size()} "
              f"model={grid.get_slice_parallel_world_size()} data={grid.get_data_parallel_world_size()} "
              f"micro_batch={micro} micro_batches/step={gas} pipe_partitioned={engine.is_pipe_partitioned}",
              flush=True)
    t0, first = time.perf_counter(), None
    with comm.CommCounter() as counter:          # the phantom collectives of the training loop
        for step in range(1, args.steps + 1):
            loss = float(engine.train_batch(data_iter=data))
            first = loss if first is None else first
            if rank0 and (step % args.log_every == 0 or step == 1):
                print(f"step {step:4d}  loss {loss:.5f}", flush=True)
    seconds = time.perf_counter() - t0
    if rank0:
        print(f"done: loss {first:.4f} -> {loss:.4f} in {args.steps} steps, "
              f"{seconds / args.steps * 1e3:.1f} ms/step, phantom bytes sent by rank 0/step "
              f"{counter.sent_bytes / args.steps:.0f}", flush=True)


if __name__ == "__main__":
    main()
    if dist.is_initialized():     # gloo ranks that skip this can abort at exit (pytorch#190489)
        dist.destroy_process_group()
