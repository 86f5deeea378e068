"""DeepSpeed adapter: a ``"phantom_parallel"`` section in the JSON config, under the ``deepspeed`` launcher.

With the plugin installed the section alone is enough: the import hook installed with the
package (:mod:`phantom_plugin.integrations.deepspeed_autoload`) routes every ``deepspeed.initialize`` call whose config
has it here, Hugging Face ``Trainer`` and Accelerate included. The explicit form:

    from phantom_plugin.deepspeed import initialize       # instead of deepspeed.initialize
    engine, optimizer, _, _ = initialize(args=args, model=model, model_parameters=model.parameters())

Modules: :mod:`.config` (the validated section), :mod:`.groups` (phantom x data groups, ``mpu``),
:mod:`.engine` (``initialize``), :mod:`.remap` (optimizers built before conversion),
:mod:`.lr_groups` (``lr_multipliers``: phantom-aware optimizer groups, scheduler scaling),
:mod:`.export` (``to_dense``), :mod:`.hf` (Accelerate's data sharding), :mod:`.pipe`
(``PipelineModule`` topology and boundary guard), :mod:`.routing` (collectives through
``deepspeed.comm``), :mod:`.monitor` (monitor events), :mod:`.checkpoint` (the layout a
checkpoint carries and its check), :mod:`.zero3` (``zero.Init`` models, ZeRO-3 export). Importing this package imports deepspeed;
the core package never does. To switch the section on by hand where the site hook does not run
(``python -S``), call ``phantom_plugin.integrations.deepspeed_autoload.register()``.
"""
from .config import PhantomConfigError, PhantomParallelConfig, load_section
from .engine import PhantomRun, initialize
from .export import to_dense
from .groups import PhantomMPU, build_groups
from .pipe import phantom_topology

__all__ = ["initialize", "to_dense", "PhantomParallelConfig",
           "PhantomConfigError", "load_section", "PhantomRun", "PhantomMPU", "build_groups",
           "phantom_topology"]

