"""Where one phantom rank's step spends its time on a GPU (run by ``benchmarks/gpu_check.sh``).

One rank of ``ops.phantom_linear`` (resident exchange, as ``gpu_layer_check.py``) at one shape,
forward + backward: per-call wall time with and without a device sync per call, forward alone,
backward alone, and a ``torch.profiler`` table (CPU and CUDA self time per op). Writes
``OUT/gpu_profile.txt``. ``--device cpu`` runs it small on CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import gpu_layer_check as glc  # noqa: E402


def _wall(fn, sync, iters):
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    row = {"tokens": args.tokens, "n": args.n, "shard": args.n // args.p, "k": args.k, "p": args.p}
    (x, L, C, D, dy), (gathered, reduced), _, _ = glc._tensors(row, device, dtype)
    lines = [f"{torch.cuda.get_device_name(device) if cuda else 'cpu'} torch {torch.__version__} "
             f"n {args.n} p {args.p} k {args.k} tokens {args.tokens} {dtype}"]
    iters = 200 if cuda else 5
    with glc.resident_exchange(args.p, args.p // 2, gathered, reduced):
        step = lambda: glc._phantom_step(x, L, C, D, dy, args.p)  # noqa: E731
        lines.append(f"step, no sync per call: {_wall(step, sync, iters) * 1e3:.3f} ms")
        lines.append(f"step, sync per call: {_wall(lambda: (step(), sync()), lambda: None, iters) * 1e3:.3f} ms")
        fwd = lambda: glc._phantom_forward(x.detach(), L.detach(), C.detach(), D.detach(), args.p)  # noqa: E731
        lines.append(f"forward (inference_mode): {_wall(fwd, sync, iters) * 1e3:.3f} ms")
        y = glc.ops.phantom_linear(x, L, C, D, None, glc._EXCHANGED, args.p // 2)
        bwd = lambda: torch.autograd.grad(y, (x, L, C, D), dy, retain_graph=True)  # noqa: E731
        lines.append(f"backward alone: {_wall(bwd, sync, iters) * 1e3:.3f} ms")
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for _ in range(20):
                step()
            sync()
    ka = prof.key_averages(group_by_input_shape=True)
    lines.append(ka.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30))
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_profile.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
