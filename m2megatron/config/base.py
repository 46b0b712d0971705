"""Shared machinery for the typed config dataclasses.

Every config is a keyword-only dataclass whose fields carry an attribute docstring (the string
literal right after the field, as Megatron-Core's TransformerConfig does). `field_docs` reads those
docstrings back for `--help` output and for a test that insists every field has one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad setting. The message starts with the dotted name of the setting that is wrong."""


class InputError(ValueError):
    """Bad input from the user: a file, a checkpoint or a flag. The message names it. Entry points print it
    as one line (m2megatron.cli.run_main); library packages raise it (or a subclass) instead of a CLI type."""


def require_at_least(section: str, obj: Any, names: tuple[str, ...], minimum: float, note: str = "") -> None:
    """A ConfigError naming `section.name` for the first of `names` whose value is below `minimum`."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise ConfigError(f"{section}.{name}: must be >= {minimum}{note}, got {value}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field of `cls` to its attribute docstring ('' when missing)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                if isinstance(nxt.value.value, str):
                    doc = " ".join(nxt.value.value.split())
            docs[node.target.id] = doc
    return docs


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) `value` against the annotation `tp`; raise ConfigError naming `name`."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: may not be null")
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(base) or (Any,)
        items = [coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
        return origin(items) if origin is tuple else items
    if base is Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return update_dataclass(base(), value, prefix=name)
    return value


def update_dataclass(obj: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass `obj` with `values` (possibly nested dicts) applied and type-checked."""
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"{dotted}: unknown setting (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = update_dataclass(current, value, prefix=dotted)
        else:
            changes[key] = coerce(dotted, value, hints[key])
    return dataclasses.replace(obj, **changes)


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-friendly dict of a (nested) config dataclass."""
    return dataclasses.asdict(obj)
