"""``engine.save_checkpoint`` / ``load_checkpoint`` with phantom layers: the layout travels with the files.

DeepSpeed saves a phantom engine's state as it does any model-parallel one: module weights per
model (= phantom) rank (``mp_rank_XX_model_states.pt``; a pipeline's ``layer_XX-model_XX-...``),
ZeRO optimizer partitions per data and model rank. A resumed run therefore continues exactly --
at the same layout. At another phantom size or ``ghost_neurons`` the tensors have other shapes,
and DeepSpeed's own checkpoint loaders would either fail half-way (some modules already
overwritten) or, for a pipeline at another model-parallel size, merge/split the files as if they
were Megatron tensor-parallel shards: silently wrong.

:func:`attach` wraps the two methods of one engine (instance attributes; Hugging Face ``Trainer``
calls the same ones):

* ``save_checkpoint`` also writes ``<save_dir>/<tag>/phantom_parallel.json`` (the layout: size,
  ghost neurons, converted modules and each layer's ghost neurons; a pipeline one file per stage,
  ``phantom_parallel-stage_XX.json``), atomically, from the first rank of each node and of each
  stage;
* ``load_checkpoint`` reads that file first, on every rank (no collective: every rank reaches the
  same verdict from the same file), and raises :class:`~.config.PhantomConfigError` naming both
  layouts -- before DeepSpeed reads or changes anything. :func:`phantom_plugin.deepspeed.to_dense`
  is the way to another size: load at the saved layout, export the dense model, convert it anew.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

from .config import SECTION, PhantomConfigError

__all__ = ["LAYOUT_FILE", "layout_of", "attach", "check_layout", "saved_layout"]

LAYOUT_FILE = "phantom_parallel.json"


def layout_of(run, model) -> dict:
    """The layout a checkpoint of ``model`` (converted by ``run``) depends on."""
    from ..convert import PhantomEdgeLinear
    layers = {name: m.phantom.ghost_dim for name, m in model.named_modules()
              if isinstance(m, PhantomEdgeLinear)}
    return {"size": run.config.size, "ghost_neurons": run.config.ghost_neurons,
            "converted": [c.name for c in run.conversions], "layer_ghost_neurons": layers}


def _tag(load_dir: str, tag) -> Optional[str]:
    if tag is not None:
        return str(tag)
    for name in ("latest_universal", "latest"):
        path = os.path.join(load_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
    return None


def _file(stage: Optional[int]) -> str:
    return LAYOUT_FILE if stage is None else LAYOUT_FILE.replace(".json", f"-stage_{stage:02d}.json")


def saved_layout(load_dir: str, tag=None, stage: Optional[int] = None) -> tuple[Optional[str], Optional[dict]]:
    """``(tag, layout)`` of a checkpoint (of one pipeline ``stage``); ``layout`` is ``None``
    when it has no layout file."""
    tag = _tag(load_dir, tag)
    if tag is None:
        return None, None
    path = os.path.join(load_dir, tag, _file(stage))
    if not os.path.isfile(path):
        return tag, None
    with open(path, encoding="utf-8") as f:
        return tag, json.load(f)


def _show(layout: dict) -> str:
    return f"{SECTION}.size={layout['size']}, ghost_neurons={layout['ghost_neurons']}"


_FIX = ("A phantom checkpoint loads only at the layout it was saved with. To continue at another "
        "size or ghost_neurons: load it with the saved section, call "
        "phantom_plugin.deepspeed.to_dense(engine) (the exact dense model; save_pretrained / "
        "torch.save it), then start the new run from that dense model with the new section")


def check_layout(load_dir: str, tag, mine: dict, stage: Optional[int] = None) -> None:
    """Raise :class:`PhantomConfigError` unless the checkpoint at ``load_dir``/``tag`` has layout ``mine``."""
    tag, saved = saved_layout(load_dir, tag, stage)
    if tag is None or not os.path.isdir(os.path.join(load_dir, tag)):
        return               # DeepSpeed reports a missing checkpoint itself (and loads nothing)
    where = os.path.join(load_dir, tag)
    if saved is None:
        raise PhantomConfigError(
            f"load_checkpoint: {where} has no {_file(stage)}, so it was not saved by a "
            f"{SECTION} engine (this run has {_show(mine)}); a dense checkpoint does not fit "
            "phantom layers: load its weights into the dense model before initialize (the SVD "
            "then converts them), or save the checkpoint from a phantom engine")
    diffs = [k for k in ("size", "ghost_neurons", "converted", "layer_ghost_neurons")
             if saved.get(k) != mine.get(k)]
    if diffs:
        raise PhantomConfigError(
            f"load_checkpoint: {where} was saved with {_show(saved)} (converted "
            f"{saved.get('converted')}), this run has {_show(mine)} (converted "
            f"{mine.get('converted')}); differing: {', '.join(diffs)}. Nothing was loaded. " + _FIX)


def _write_layout(save_dir: str, tag: str, layout: dict, stage: Optional[int], writer: bool) -> None:
    if not writer:
        return
    where = os.path.join(save_dir, tag)
    os.makedirs(where, exist_ok=True)
    tmp = os.path.join(where, f".{_file(stage)}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(layout, f, indent=1)
    os.replace(tmp, os.path.join(where, _file(stage)))


def attach(engine, run) -> None:
    """Wrap ``engine.save_checkpoint`` / ``load_checkpoint`` with the layout file and its check."""
    if getattr(engine.save_checkpoint, "_phantom_plugin_wrapper", False):
        return
    import torch.distributed as dist
    from deepspeed.runtime.pipe.engine import PipelineEngine
    save, load = engine.save_checkpoint, engine.load_checkpoint
    model = engine.module
    stage = engine.stage_id if isinstance(engine, PipelineEngine) else None
    rank = dist.get_rank()
    writer = (int(os.environ.get("LOCAL_RANK", "0")) == 0
              or (rank == run.groups.phantom_ranks[0] and rank == run.groups.data_ranks[0]))

    @functools.wraps(save)
    def save_checkpoint(save_dir, tag=None, *args, **kwargs):
        tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
        out = save(save_dir, tag, *args, **kwargs)
        _write_layout(str(save_dir), tag, layout_of(run, model), stage, writer)
        return out

    @functools.wraps(load)
    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        check_layout(str(load_dir), tag, layout_of(run, model), stage)
        return load(load_dir, tag, *args, **kwargs)

    save_checkpoint._phantom_plugin_wrapper = load_checkpoint._phantom_plugin_wrapper = True
    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint
