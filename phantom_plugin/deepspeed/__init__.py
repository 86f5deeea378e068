"""DeepSpeed adapter: a ``"phantom_parallel"`` section in the JSON config, under the ``deepspeed`` launcher.

    from phantom_plugin.deepspeed import initialize       # instead of deepspeed.initialize
    engine, optimizer, _, _ = initialize(args=args, model=model, model_parameters=model.parameters())

Modules: :mod:`.config` (the validated section), :mod:`.groups` (phantom x data groups, ``mpu``),
:mod:`.engine` (``initialize``), :mod:`.pipe` (``PipelineModule`` topology and boundary guard),
:mod:`.routing` (collectives through ``deepspeed.comm``), :mod:`.monitor` (monitor events).
Importing this package imports deepspeed; the core package never does.
"""
from .config import PhantomConfigError, PhantomParallelConfig, load_section
from .engine import PhantomRun, initialize
from .groups import PhantomMPU, build_groups
from .pipe import phantom_topology

__all__ = ["initialize", "PhantomParallelConfig", "PhantomConfigError", "load_section", "PhantomRun",
           "PhantomMPU", "build_groups", "phantom_topology"]
