"""What only an NGC host has: Transformer Engine and DALI (too large to carry to a bare GPU host)."""

from __future__ import annotations

import importlib.util

import pytest


def _importable(module: str) -> bool:
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - TE and DALI raise more than ImportError when broken
        return False
    return True


def require(module: str, what: str) -> None:
    """Skip the calling test with the reason the GPU check prints, unless `module` imports."""
    if not _importable(module):
        pytest.skip(f"needs an NGC host ({what} is not installed)")


def require_te() -> None:
    require("transformer_engine.pytorch", "Transformer Engine")


def require_dali() -> None:
    require("nvidia.dali", "DALI")
