"""Test helpers: spawn real gloo ranks on CPU (see :mod:`phantom_plugin.launch`), end a rank cleanly."""
from phantom_plugin.launch import free_port, run_ranks  # noqa: F401


def end_process_group() -> None:
    """Barrier, then ``destroy_process_group`` at the end of a rank started by a launcher.

    A rank that exits with gloo's worker threads still alive can abort in the interpreter's
    teardown ("terminate called without an active exception", rc -6; pytorch/pytorch#190489),
    now and then, after all its work was done: every launcher-run rank script ends here.
    """
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
