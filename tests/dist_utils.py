"""Test helper: spawn real gloo ranks on CPU (see :mod:`phantom_plugin.launch`)."""
from phantom_plugin.launch import free_port, run_ranks  # noqa: F401
