"""Train a residual MLP stack with DeepSpeed; phantom parallelism comes from the JSON config.

    deepspeed --num_gpus 2 examples/train_ffn_deepspeed.py --deepspeed --deepspeed_config ds_configs/phantom_ffn.json

On a machine without GPUs DeepSpeed uses its CPU accelerator and gloo (``DS_ACCELERATOR=cpu``).
The script is an ordinary DeepSpeed script. It calls ``phantom_plugin.deepspeed.initialize``, the
explicit form, which reads the config's ``"phantom_parallel"`` section (without it, or with
``"enabled": false``, it is ``deepspeed.initialize``); with the plugin installed a plain
``deepspeed.initialize`` does the same through the plugin's import hook. The same script runs
the DeepSpeed AutoTP baseline with ``ds_configs/tp_ffn.json``.

The task is regression onto a fixed random teacher network; each data-parallel rank draws its own
batches, the ranks of one phantom (or TP) group draw the same ones.
"""
from __future__ import annotations

import argparse
import time

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from phantom_plugin import comm
from phantom_plugin.deepspeed import initialize


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``: the layout ``target_modules: ["mlp"]`` converts."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d_in: int, width: int, hidden: int, depth: int, d_out: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(width), "mlp": MLP(width, hidden)})
                                    for _ in range(depth))
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b["mlp"](b["norm"](h))
        return self.head(h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log_every", type=int, default=10)
    ap = deepspeed.add_config_arguments(ap)
    args = ap.parse_args()

    d_in = d_out = 32
    torch.manual_seed(0)                    # the same dense model on every rank
    model = Net(d_in, args.width, args.hidden, args.depth, d_out)
    teacher = Net(d_in, 64, 128, 1, d_out).requires_grad_(False)
    engine, _, _, _ = initialize(args=args, model=model, model_parameters=model.parameters())
    device = engine.device                  # the rank's GPU under NCCL, the CPU under DS_ACCELERATOR=cpu
    teacher.to(device)

    mpu = engine.mpu
    dp_rank = mpu.get_data_parallel_rank() if mpu is not None else dist.get_rank()
    gen = torch.Generator().manual_seed(1000 + dp_rank)
    micro = engine.train_micro_batch_size_per_gpu()
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"world={dist.get_world_size()} dp={engine.dp_world_size} micro_batch={micro} "
              f"params/rank={sum(p.numel() for p in engine.module.parameters())}", flush=True)
    t0, first = time.perf_counter(), None
    with comm.CommCounter() as counter:          # the phantom collectives of the training loop
        for step in range(1, args.steps + 1):
            for _ in range(engine.gradient_accumulation_steps()):
                x = torch.randn(micro, d_in, generator=gen).to(device)   # drawn on the CPU: same on any device
                loss = nn.functional.mse_loss(engine(x).float(), teacher(x))
                engine.backward(loss)
                engine.step()
            first = loss.item() if first is None else first
            if rank0 and (step % args.log_every == 0 or step == 1):
                print(f"step {step:4d}  loss {loss.item():.5f}", flush=True)
    seconds = time.perf_counter() - t0
    run = getattr(engine, "phantom", None)       # set by phantom_plugin.deepspeed.initialize
    if rank0:
        sent = (f", phantom bytes sent by rank 0/step {counter.sent_bytes / args.steps:.0f}"
                if run is not None else "")
        print(f"done: loss {first:.4f} -> {loss.item():.4f} in {args.steps} steps, "
              f"{seconds / args.steps * 1e3:.1f} ms/step{sent}", flush=True)
        if run is not None and run.logger is not None and run.logger.events:
            last = run.logger.events[-1][2]
            print(f"monitor events at sample {last}: " + ", ".join(
                f"{n}={v:.4g}" for n, v, at in run.logger.events if at == last))
    if deepspeed.comm.comms_logger.enabled:       # a "comms_logger" section (off in ds_configs/: it
                                                  # synchronizes after every collective): DeepSpeed's table
        deepspeed.comm.log_summary()


if __name__ == "__main__":
    main()
    if dist.is_initialized():     # gloo ranks that skip this can abort at exit (pytorch#190489)
        dist.destroy_process_group()
