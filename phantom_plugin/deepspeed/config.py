"""The ``"phantom_parallel"`` section of a DeepSpeed JSON config.

Validated like DeepSpeed's own sections (a ``DeepSpeedConfigModel``: pydantic v2, unknown keys
forbidden), but strictly: ``"auto"``, strings for numbers and numbers for booleans are errors
here, not silently replaced. :func:`load_section` turns every problem into one
:class:`PhantomConfigError` whose lines each name the field (``phantom_parallel.size: ...``) and
say how to fix it. :func:`check_run` adds the checks that need the world size and the rest of the
DeepSpeed config. Neither touches torch.distributed: both run before any process group exists.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Literal, Optional, Union

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator, model_validator

from ..optim import KINDS
from .routing import COMM_DTYPES

__all__ = ["SECTION", "PhantomParallelConfig", "PhantomConfigError", "load_section", "load_ds_config",
           "check_run", "world_size_from_env"]

SECTION = "phantom_parallel"

_HELP = {
    "enabled": "use true or false (false, or no section, leaves DeepSpeed untouched)",
    "size": "use an integer >= 1 that divides the number of ranks (ranks per phantom group)",
    "ghost_neurons": ("use an integer k >= 1 (ghost neurons per rank and layer, capped at each "
                      "layer's in_features/size, where the layer is exact)"),
    "target_modules": "use a non-empty list of regular expressions over module names, e.g. [\"mlp\"]",
    "init_from_dense": "use true (truncated SVD of the dense weights) or false (fresh seeded weights)",
    "seed": "use an integer (seed of fresh phantom weights when init_from_dense is false)",
    "comm_dtype": (f"use null (the layers' dtype), {', '.join(json.dumps(n) for n in list(COMM_DTYPES)[:-1])} "
                   f"or {json.dumps(list(COMM_DTYPES)[-1])}"),
    "log_interval": "use an integer >= 0, optimizer steps between monitor events (0: off)",
    "lr_multipliers": ("use \"auto\" (phantom_plugin.param_groups' default parametrization, \"balanced\": "
                       "compressors and decompressors at lr x 1/(1+k/(in_features/size))), false (one lr "
                       "for every parameter) or an object {kind: number > 0} with kinds " + ", ".join(KINDS)),
}


class PhantomConfigError(ValueError):
    """A bad ``phantom_parallel`` section; the message has one line per problem."""


class PhantomParallelConfig(DeepSpeedConfigModel):
    """``"phantom_parallel": {...}``; each field is described in ``docs/deepspeed.md``."""

    enabled: StrictBool = False
    size: StrictInt = Field(2, ge=1)
    ghost_neurons: Optional[StrictInt] = Field(None, ge=1)
    target_modules: list[StrictStr] = Field(default_factory=list)
    init_from_dense: StrictBool = True
    seed: StrictInt = 0
    comm_dtype: Optional[Literal[tuple(COMM_DTYPES)]] = None     # "fp32", "bf16" or "fp16"
    log_interval: StrictInt = Field(0, ge=0)
    lr_multipliers: Union[Literal["auto", "off"], dict[str, float]] = "auto"
    """``"auto"``, ``"off"`` (given as false, null or "off") or ``{kind: multiplier}``; see :mod:`.lr_groups`."""

    def __init__(self, **data):
        super().__init__(strict=True, **data)     # keep "auto" so that it is rejected

    @field_validator("target_modules")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for i, pat in enumerate(value):
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"entry {i} {pat!r} is not a valid regular expression ({e})") from e
        return value

    @field_validator("lr_multipliers", mode="before")
    @classmethod
    def _multipliers(cls, value: Any) -> Any:
        if value is None or value is False or value == "off":
            return "off"
        if value == "auto":
            return value
        if not isinstance(value, dict) or not value:
            raise ValueError("must be \"auto\", false/null/\"off\" or a non-empty object {kind: number > 0}")
        unknown = [k for k in value if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown kind(s) {unknown}")
        for kind, mult in value.items():
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 < mult < float("inf"):
                raise ValueError(f"multiplier of {kind!r} must be a number > 0")
        return {kind: float(mult) for kind, mult in value.items()}

    @model_validator(mode="after")
    def _required_when_enabled(self) -> "PhantomParallelConfig":
        if self.enabled:
            missing = [f for f in ("ghost_neurons", "target_modules") if not getattr(self, f)]
            if missing:
                raise ValueError("required when enabled: " + ", ".join(missing))
        return self


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"] if not isinstance(x, int)) or None
        msg = e["msg"].removeprefix("Value error, ")
        if field is None:       # model-level: name the missing fields
            names = msg.split(": ", 1)[-1].split(", ") if "required when enabled" in msg else []
            lines += [f"{SECTION}.{n}: required when enabled is true; {_HELP[n]}" for n in names] or [f"{SECTION}: {msg}"]
            continue
        top = field.split(".")[0]
        got = f" (got {e['input']!r})" if "input" in e and e["type"] != "missing" else ""
        hint = _HELP.get(top)
        if e["type"] == "extra_forbidden":
            hint = "remove it; allowed keys: " + ", ".join(PhantomParallelConfig.model_fields)
        lines.append(f"{SECTION}.{field}: {msg}{got}" + (f"; {hint}" if hint else ""))
    return "\n".join(lines)


def load_ds_config(config: Union[str, os.PathLike, dict, None]) -> dict:
    """The DeepSpeed config as a dict (a path is read as JSON)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    with open(config, encoding="utf-8") as f:
        return json.load(f)


def load_section(config: Union[str, os.PathLike, dict, None]) -> Optional[PhantomParallelConfig]:
    """The validated section, or ``None`` when absent. Raises :class:`PhantomConfigError`."""
    ds = load_ds_config(config)
    section: Any = ds.get(SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise PhantomConfigError(f"{SECTION}: must be a JSON object, got {type(section).__name__}")
    try:
        return PhantomParallelConfig(**section)
    except ValidationError as e:
        raise PhantomConfigError("invalid DeepSpeed config section:\n" + _format(e)) from None


def world_size_from_env() -> int:
    """World size without a process group: torch.distributed if initialized, else ``WORLD_SIZE``."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_run(cfg: PhantomParallelConfig, ds: dict, world_size: int, *, pipeline: bool,
              pipe_stages: int = 1) -> None:
    """Checks against the world size and the other sections; raises :class:`PhantomConfigError`."""
    errors = []
    ranks = world_size // max(pipe_stages, 1)
    if world_size % (cfg.size * pipe_stages):
        what = f"pipeline stages x size = {pipe_stages} x {cfg.size}" if pipeline else f"size={cfg.size}"
        errors.append(f"{SECTION}.size: {what} does not divide the {world_size} ranks; choose a size "
                      f"that divides {ranks}")
    errors += _autotp_errors(cfg, ds.get("tensor_parallel") or {}, pipeline)
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        errors.append(f"zero_optimization.stage: {stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
    if stage == 3:
        errors += _zero3_errors(zero, pipeline)
    if pipeline:
        pipe = ds.get("pipeline") or {}
        for key in ("pipe_partitioned", "grad_partitioned"):
            if pipe.get(key) is True:
                errors.append(f"pipeline.{key}: true assumes stage-boundary activations are "
                              f"identical across the model axis, which phantom-sharded ones are "
                              f"not (silently wrong results); set it to false or leave it out "
                              f"({SECTION} turns it off)")
    if errors:
        raise PhantomConfigError("invalid DeepSpeed config for phantom parallelism:\n" + "\n".join(errors))


_ZERO3_UNSUPPORTED = {
    "offload_param": ("parameter offload moves parameters to the host between uses, and the "
                      "phantom layers' autograd functions keep their parameter tensors for the "
                      "backward pass (untested, so refused); remove it"),
    "zero_quantized_weights": ("quantized weight gathers round the phantom blocks the SVD made "
                               "exact; remove it or set it to false"),
    "zero_hpz_partition_size": ("hierarchical partitioning (ZeRO++ hpZ) builds its own secondary "
                                "groups over the whole world, not over the data-parallel group; "
                                "remove it or set it to 1"),
    "mics_shard_size": ("MiCS shards over its own groups, not over the data-parallel group; remove "
                        "it or set it to -1"),
}


def _zero3_errors(zero: dict, pipeline: bool) -> list[str]:
    """The ZeRO-3 options the phantom layers cannot honour (and pipelines, which DeepSpeed refuses)."""
    errors = []
    if pipeline:
        errors.append("zero_optimization.stage: 3 with a PipelineModule (DeepSpeed pipelines accept "
                      "ZeRO-1 only); use stage 0 or 1")
    for key, why in _ZERO3_UNSUPPORTED.items():
        value = zero.get(key)
        off = (value in (None, False, 1) if key == "zero_hpz_partition_size"
               else value in (None, False, -1) if key == "mics_shard_size"
               else value in (None, False))
        if key == "offload_param" and isinstance(value, dict):
            off = value.get("device", "none") in (None, "none")
        if not off:
            errors.append(f"zero_optimization.{key}: {value!r} is not supported with {SECTION} under "
                          f"ZeRO-3: {why}")
    return errors


ATTENTION_ONLY = {"use_default_specs": False, "layer_specs": [
    {"patterns": [".*\\.o_proj\\.weight$"], "partition_type": "row"},
    {"patterns": [".*\\.[qkv]_proj\\.weight$"], "partition_type": "column"}]}
"""A ``tensor_parallel.partition_config`` that shards only Llama-style attention (q/k/v column, o row)."""


def _autotp_errors(cfg: PhantomParallelConfig, tp: dict, pipeline: bool) -> list[str]:
    """AutoTP next to phantom MLPs: same size, attention only (an explicit ``partition_config``)."""
    size = tp.get("autotp_size", 0)
    if size in (0, 1, None):
        return []
    errors = []
    if pipeline:
        errors.append("tensor_parallel.autotp_size: AutoTP with a PipelineModule is not supported by "
                      "DeepSpeed; remove the tensor_parallel section")
    if size != cfg.size:
        errors.append(f"tensor_parallel.autotp_size: {size} differs from {SECTION}.size={cfg.size}; "
                      "AutoTP attention and phantom MLPs share one group of ranks: set both to the "
                      "same value")
    pc = tp.get("partition_config")
    if not isinstance(pc, dict) or pc.get("use_default_specs", True) is not False or not pc.get("layer_specs"):
        errors.append(f"tensor_parallel.partition_config: with {SECTION}, AutoTP must be told to shard "
                      "attention only (its default specs and the model's own tp_plan shard the MLP "
                      "too); give \"partition_config\": {\"use_default_specs\": false, \"layer_specs\": "
                      "[...]} naming only attention layers, e.g. "
                      + json.dumps(ATTENTION_ONLY))
    return errors


def autotp_patterns(ds: dict) -> list[str]:
    """Every weight-name pattern of the config's AutoTP ``partition_config`` (``[]`` without AutoTP)."""
    tp = ds.get("tensor_parallel") or {}
    if tp.get("autotp_size", 0) in (0, 1, None):
        return []
    specs = (tp.get("partition_config") or {}).get("layer_specs") or []
    return [p for spec in specs for p in (spec.get("patterns") or [])]
