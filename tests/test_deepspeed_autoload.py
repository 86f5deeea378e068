"""The import hook: the ``phantom_parallel`` section alone takes effect after ``pip install``.

Fresh interpreters (subprocesses) check what the ``.pth`` file does at start: the hook is on
``sys.meta_path`` without torch imported, ``deepspeed.initialize`` and Accelerate's
``_prepare_deepspeed`` are wrapped once imported, ``PHANTOM_PLUGIN_AUTOLOAD=0`` leaves them alone,
``register()`` / ``unregister()`` switch by hand. Both installs are checked: the editable one
``make`` does (this virtualenv) and a plain ``pip install`` of a copy of the sources into a
throwaway target directory, read through ``site.addsitedir`` as site-packages would be.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from torch import nn

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parent.parent


def _py(code: str, *, env: dict | None = None, flags: tuple = ()) -> dict:
    """Run ``code`` in a fresh interpreter of this virtualenv; it prints one JSON line last."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PHANTOM_PLUGIN_AUTOLOAD")}
    full_env.update(env or {}, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, *flags, "-c", code], cwd="/", env=full_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_PROBE = """
import json, sys
hooked = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "PhantomImportHook"]
torch_at_start = "torch" in sys.modules
import deepspeed, accelerate.accelerator as acc
res = {"hook": hooked, "torch_at_start": torch_at_start,
       "ds_wrapped": getattr(deepspeed.initialize, "_phantom_plugin_wrapper", False),
       "acc_wrapped": getattr(acc.Accelerator._prepare_deepspeed, "_phantom_plugin_wrapper", False),
       "ds_loader_clean": type(deepspeed.__spec__.loader).__name__ != "_Loader"}
"""


def test_site_hook_is_light_and_wraps_on_import():
    r = _py(_PROBE + "print(json.dumps(res))")
    assert r["hook"] == ["PhantomImportHook"] and r["torch_at_start"] is False
    assert r["ds_wrapped"] is True and r["acc_wrapped"] is True and r["ds_loader_clean"]


def test_env_off_then_register_and_unregister():
    r = _py(_PROBE + """
import phantom_plugin.deepspeed
import phantom_plugin.integrations.deepspeed_autoload as pd
res["phantom_import_keeps_off"] = getattr(deepspeed.initialize, "_phantom_plugin_wrapper", False)
pd.register(); pd.register()
res["registered"] = (getattr(deepspeed.initialize, "_phantom_plugin_wrapper", False),
                     getattr(acc.Accelerator._prepare_deepspeed, "_phantom_plugin_wrapper", False),
                     getattr(deepspeed.initialize.__wrapped__, "_phantom_plugin_wrapper", False))
pd.unregister()
res["unregistered"] = (getattr(deepspeed.initialize, "_phantom_plugin_wrapper", False),
                       getattr(acc.Accelerator._prepare_deepspeed, "_phantom_plugin_wrapper", False),
                       any(type(f).__name__ == "PhantomImportHook" for f in sys.meta_path))
print(json.dumps(res))""", env={"PHANTOM_PLUGIN_AUTOLOAD": "0"})
    assert r["hook"] == [] and r["ds_wrapped"] is False and r["acc_wrapped"] is False
    assert r["phantom_import_keeps_off"] is False
    assert r["registered"] == [True, True, False]          # wrapped once, not twice
    assert r["unregistered"] == [False, False, False]


def test_plain_install_drops_the_pth_into_site_packages(tmp_path):
    src, target = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name in ("setup.py", "README.md", "phantom_plugin_autoload.pth"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("phantom_plugin", "integrations"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          "--no-build-isolation", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (target / "phantom_plugin_autoload.pth").is_file()
    assert (target / "phantom_plugin" / "integrations" / "deepspeed_autoload.py").is_file()
    assert (target / "phantom_plugin" / "integrations" / "megatron_lm" / "phantom_spec.py").is_file()
    assert not (target / "integrations").exists()           # no top-level package of that name
    # -S: no site-packages at start; then the target as a site directory (its .pth files run),
    # then this virtualenv's site-packages for torch and deepspeed
    site_dir = sysconfig.get_paths()["purelib"]
    r = _py(f"""
import json, site, sys
site.addsitedir({str(target)!r})
import phantom_plugin.integrations.deepspeed_autoload as m
res = {{"module": m.__file__, "torch": "torch" in sys.modules,
        "hook": any(type(f).__name__ == "PhantomImportHook" for f in sys.meta_path)}}
site.addsitedir({site_dir!r})
import deepspeed, phantom_plugin
res["ds_wrapped"] = getattr(deepspeed.initialize, "_phantom_plugin_wrapper", False)
res["package"] = phantom_plugin.__file__
print(json.dumps(res))""", flags=("-S",))
    assert r["module"].startswith(str(target)) and r["package"].startswith(str(target))
    assert r["hook"] is True and r["torch"] is False and r["ds_wrapped"] is True


@pytest.mark.fast
def test_wrapper_routes_only_configs_with_the_section(tmp_path, monkeypatch):
    """In this process: a bad section reaches the
    plugin's validation through plain ``deepspeed.initialize``; no section reaches DeepSpeed."""
    import deepspeed
    import torch.distributed as dist
    import phantom_plugin.integrations.deepspeed_autoload as hook
    from phantom_plugin.deepspeed import PhantomConfigError
    from phantom_plugin.integrations.deepspeed_autoload import register
    register()                 # what the site hook did at start (unless PHANTOM_PLUGIN_AUTOLOAD=0)
    assert getattr(deepspeed.initialize, "_phantom_plugin_wrapper", False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    bad = {"train_micro_batch_size_per_gpu": 2,
           "phantom_parallel": {"enabled": True, "size": 2, "ghost_neurons": 4, "target_modules": ["x"],
                                "ghost_neuron": 4}}
    with pytest.raises(PhantomConfigError, match="phantom_parallel.ghost_neuron: Extra inputs"):
        deepspeed.initialize(model=model, config=bad)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(bad))
    args = type("Args", (), {"deepspeed_config": str(path), "local_rank": 0})()
    with pytest.raises(PhantomConfigError, match="phantom_parallel.ghost_neuron"):
        deepspeed.initialize(args=args, model=model)
    with pytest.raises(PhantomConfigError, match="phantom_parallel.ghost_neuron"):
        deepspeed.initialize(None, model, None, None, None, None, 29500, None, None, None, bad)
    assert not dist.is_initialized() and isinstance(model[0], nn.Linear)
    assert hook.has_phantom_section(str(path)) and not hook.has_phantom_section({"train_batch_size": 2})
    assert not hook.has_phantom_section(str(tmp_path / "missing.json"))
    with pytest.raises(AssertionError, match="requires a model"):     # DeepSpeed's own check
        deepspeed.initialize(model=None, config={"train_batch_size": 2})
