"""The megatron-core releases this adapter supports, checked once at import.

Tested: 0.16.1 (the newest release Python 3.11 resolves) and 0.19.2 (the newest, Python 3.12),
both in ``make test``; 0.17.1 and 0.18.2 passed the same Megatron tests once, by hand. Releases
before 0.16 are refused here, with the fix, rather than failing deep inside an import: 0.15.3, for
one, lacks ``megatron.core.transformer.utils.ensure_metadata_has_dp_cp_group``, which
``PhantomMLP.sharded_state_dict`` uses.
"""
from __future__ import annotations

import re

MIN_MEGATRON_CORE = (0, 16)
TESTED = "0.16.1, 0.17.1, 0.18.2, 0.19.2"


def _installed_version() -> str:
    import megatron.core
    version = getattr(megatron.core, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version
        version = dist_version("megatron-core")
    return str(version)


def parse_version(version: str) -> tuple:
    """``"0.19.2+abc"`` -> ``(0, 19)``; raises ``ValueError`` for an unparsable string."""
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"unparsable megatron-core version {version!r}")
    return int(m.group(1)), int(m.group(2))


def check_megatron_version(version: str | None = None) -> None:
    """Raise ``ImportError`` naming the installed release and the fix when it is older than 0.16."""
    version = _installed_version() if version is None else version
    if parse_version(version) < MIN_MEGATRON_CORE:
        need = ".".join(map(str, MIN_MEGATRON_CORE))
        raise ImportError(
            f"phantom_plugin.megatron needs megatron-core >= {need} (tested {TESTED}); found "
            f"{version}. Upgrade: pip install -U 'megatron-core>={need}' (0.17 and later need "
            "Python >= 3.12)")
