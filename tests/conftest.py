import glob
import os
import sys

import pytest

# tests import their helpers (dist_utils) by module name, in spawned ranks too
sys.path.insert(0, os.path.dirname(__file__))

_DS_SHM = "/dev/shm/deepspeed_*"


def _remove_new_shm(before: set[str]) -> None:
    for path in set(glob.glob(_DS_SHM)) - before:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@pytest.fixture(autouse=True)
def _free_deepspeed_shm():
    """Remove the shared-memory files a test's DeepSpeed launches leave behind.

    DeepSpeed's CPU accelerator keeps a 66 MB all-reduce buffer per rank in /dev/shm
    (``deepspeed_allreduce_buffer_*``) and never unlinks it: /dev/shm is RAM, and a suite of
    launches filled 20 GB of this 24 GB machine. Only files that appeared during the test go.
    """
    before = set(glob.glob(_DS_SHM))
    yield
    _remove_new_shm(before)


@pytest.fixture(autouse=True, scope="module")
def _free_deepspeed_shm_of_module():
    """The same for launches in module-scoped fixtures (one launch shared by several tests),
    which run before the per-test snapshot above: their files go when the module is done."""
    before = set(glob.glob(_DS_SHM))
    yield
    _remove_new_shm(before)
