"""Test helpers: spawn real gloo ranks on CPU (see :mod:`phantom_plugin.bench.launch`), end a rank cleanly."""
from phantom_plugin.bench.launch import free_port, run_ranks  # noqa: F401


def finish_rank(out_dir, result: dict) -> None:
    """Write this rank's ``result`` to ``out_dir/rank<r>.json`` (what ``launch_results`` in
    test_deepspeed_launcher.py reads), then :func:`exit_rank`."""
    import json
    from pathlib import Path
    import torch.distributed as dist
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    exit_rank()


def exit_rank() -> None:
    """End a rank started by a launcher once its results are written: barrier, then ``os._exit(0)``.

    Ranks that leave through the interpreter's teardown abort now and then in it ("terminate called
    without an active exception", rc -6) after all their work was done: seen in CI twice in the
    ``flag`` case (ranks that caught a deliberate error raised inside a forward), with and without
    ``destroy_process_group()`` first (pytorch/pytorch#190489 describes the gloo side). The
    results are on disk by then; skipping the teardown keeps a torch/gloo exit race from failing a
    test of the plugin. Rank scripts enable ``faulthandler``, so an abort before this point still
    prints where every thread was.
    """
    import os
    import sys
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
