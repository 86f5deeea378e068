"""The plugin's import hook: the config flag alone turns phantom parallelism on.

``phantom_plugin_autoload.pth``, installed into site-packages with the package, runs
:func:`install_hook` at interpreter start. That only puts a small finder on ``sys.meta_path``
(stdlib imports only; no torch, no deepspeed). When a program later imports ``deepspeed``, the
finder wraps ``deepspeed.initialize`` right after the module has run; when it imports
``accelerate``, it wraps ``Accelerator._prepare_deepspeed``. Both wrappers look at the DeepSpeed
config and step aside unless it has a ``"phantom_parallel"`` section:

* ``deepspeed.initialize(...)`` with the section calls ``phantom_plugin.deepspeed.initialize``
  (imported then, not before), which validates it, converts the model and calls the original;
* Accelerate with an enabled section first makes its data loaders shard by data-parallel rank
  (``phantom_plugin.deepspeed.hf``), so the ranks of one phantom group get the same batches.

``PHANTOM_PLUGIN_AUTOLOAD=0`` (or ``false``/``off``/``no``) turns the hook off;
``phantom_plugin.integrations.deepspeed_autoload.register()`` / ``unregister()`` do the same by hand, for environments
that skip site hooks (``python -S``, some embedded interpreters).

Importing ``phantom_plugin`` itself is lazy (its public names load on first use), so this module,
installed as ``phantom_plugin.integrations.deepspeed_autoload``, costs no torch import at start-up.
"""
from __future__ import annotations

import functools
import importlib.abc
import json
import os
import sys
import threading
import warnings

__all__ = ["register", "unregister", "ENV", "enabled_by_env", "install_hook", "remove_hook", "patch_deepspeed",
           "unpatch_deepspeed", "patch_accelerate", "unpatch_accelerate", "original_initialize",
           "has_phantom_section", "SECTION"]

ENV = "PHANTOM_PLUGIN_AUTOLOAD"
SECTION = "phantom_parallel"
_MARK = "_phantom_plugin_wrapper"


def enabled_by_env() -> bool:
    """False when ``PHANTOM_PLUGIN_AUTOLOAD`` is ``0``, ``false``, ``off`` or ``no``."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


# --- what to find in a DeepSpeed config (stdlib only) -----------------------------------------

def _config_of(args, kwargs) -> object:
    """The config argument of a ``deepspeed.initialize`` call, by DeepSpeed's parameter order."""
    names = ("args", "model", "optimizer", "model_parameters", "training_data", "lr_scheduler",
             "distributed_port", "mpu", "dist_init_required", "collate_fn", "config", "mesh_param",
             "config_params")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    for key in ("config", "config_params"):
        if bound.get(key) is not None:
            return bound[key]
    return getattr(bound.get("args"), "deepspeed_config", None)


def has_phantom_section(config: object) -> bool:
    """Whether a DeepSpeed config (a dict or a JSON path) has a ``phantom_parallel`` key.

    Any problem reading it answers ``False``: DeepSpeed then reports the problem itself.
    """
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return False
    return isinstance(config, dict) and SECTION in config


# --- deepspeed.initialize ----------------------------------------------------------------------

def original_initialize(fn):
    """``fn`` with every phantom wrapper peeled off (the real ``deepspeed.initialize``)."""
    while getattr(fn, _MARK, False):
        fn = fn.__wrapped__
    return fn


def patch_deepspeed(ds) -> None:
    """Wrap ``ds.initialize`` (the ``deepspeed`` module) once; idempotent."""
    current = ds.initialize
    if getattr(current, _MARK, False):
        return

    @functools.wraps(current)
    def initialize(*args, **kwargs):
        if not has_phantom_section(_config_of(args, kwargs)):
            return current(*args, **kwargs)
        from phantom_plugin.deepspeed.engine import initialize as phantom_initialize
        return phantom_initialize(*args, **kwargs)

    setattr(initialize, _MARK, True)
    ds.initialize = initialize


def unpatch_deepspeed(ds) -> None:
    ds.initialize = original_initialize(ds.initialize)


# --- accelerate.Accelerator._prepare_deepspeed --------------------------------------------------

def _enabled_section(accelerator) -> object:
    config = getattr(getattr(accelerator, "deepspeed_plugin", None), "deepspeed_config", None)
    section = config.get(SECTION) if isinstance(config, dict) else None
    return config if isinstance(section, dict) and section.get("enabled") is True else None


def patch_accelerate(acc_module) -> None:
    """Wrap ``Accelerator._prepare_deepspeed`` of ``accelerate.accelerator``; idempotent."""
    cls = acc_module.Accelerator
    current = cls._prepare_deepspeed
    if getattr(current, _MARK, False):
        return

    @functools.wraps(current)
    def _prepare_deepspeed(self, *args):
        config = _enabled_section(self)
        if config is not None:
            from phantom_plugin.deepspeed.hf import shard_by_data_rank
            shard_by_data_rank(self, config)
        return current(self, *args)

    setattr(_prepare_deepspeed, _MARK, True)
    cls._prepare_deepspeed = _prepare_deepspeed


def unpatch_accelerate(acc_module) -> None:
    cls = acc_module.Accelerator
    cls._prepare_deepspeed = original_initialize(cls._prepare_deepspeed)


# --- the finder ----------------------------------------------------------------------------------

def _after_deepspeed(module) -> None:
    patch_deepspeed(module)


def _after_accelerate(module) -> None:
    acc = sys.modules.get("accelerate.accelerator")
    if acc is not None and hasattr(acc, "Accelerator"):
        patch_accelerate(acc)


_AFTER = {"deepspeed": _after_deepspeed, "accelerate": _after_accelerate}


class _Loader:
    """The real loader, plus a call to the patch once the module has executed."""

    def __init__(self, loader, after):
        self._loader, self._after = loader, after

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader                 # leave no trace of the hook
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        try:
            self._after(module)
        except (AttributeError, TypeError) as e:   # an API that moved: keep the import, say so
            warnings.warn(f"phantom_plugin: could not hook {module.__name__} ({e!r}); a "
                          f"'{SECTION}' section will not take effect unless the script calls "
                          "phantom_plugin.integrations.deepspeed_autoload.register()", RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class PhantomImportHook(importlib.abc.MetaPathFinder):
    """Finds ``deepspeed`` / ``accelerate`` with the other finders and patches them once loaded."""

    def __init__(self):
        self._busy = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _AFTER or getattr(self._busy, fullname, False):
            return None
        setattr(self._busy, fullname, True)
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            setattr(self._busy, fullname, False)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader, _AFTER[fullname])
        return spec


def _hooks() -> list:
    return [f for f in sys.meta_path if isinstance(f, PhantomImportHook)
            or type(f).__name__ == "PhantomImportHook"]


def install_hook(force: bool = False) -> bool:
    """Arrange for ``deepspeed`` / ``accelerate`` to be patched when imported (the ``.pth`` calls this).

    Modules already imported are patched now. Returns whether the hook is active; without
    ``force`` it respects ``PHANTOM_PLUGIN_AUTOLOAD=0``.
    """
    if not force and not enabled_by_env():
        return False
    if not _hooks():
        sys.meta_path.insert(0, PhantomImportHook())
    for name, after in _AFTER.items():
        if name in sys.modules:
            after(sys.modules[name])
    return True


def remove_hook() -> None:
    """Take the finder off ``sys.meta_path`` and restore every patched function."""
    for f in _hooks():
        sys.meta_path.remove(f)
    if "deepspeed" in sys.modules and hasattr(sys.modules["deepspeed"], "initialize"):
        unpatch_deepspeed(sys.modules["deepspeed"])
    acc = sys.modules.get("accelerate.accelerator")
    if acc is not None and hasattr(acc, "Accelerator"):
        unpatch_accelerate(acc)


def register() -> None:
    """Make the ``phantom_parallel`` section take effect in this process without the site hook.

    Wraps ``deepspeed.initialize`` (and ``Accelerator._prepare_deepspeed`` once accelerate is
    imported) as the import hook does, whatever ``PHANTOM_PLUGIN_AUTOLOAD`` says; idempotent.
    Call it before the program calls ``deepspeed.initialize`` / builds its data loaders. Imports
    deepspeed.
    """
    import deepspeed
    install_hook(force=True)
    patch_deepspeed(deepspeed)


def unregister() -> None:
    """Undo :func:`register` and the import hook: ``deepspeed.initialize`` is DeepSpeed's own again."""
    remove_hook()
