"""Build frozen config dataclasses from plain YAML data, checking every key once, at load.

Errors name the full YAML path of the offending key (``quant.weight.bits``) and what is allowed,
so a user can fix a recipe from the message alone.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from mecqtk.errors import RecipeError

T = TypeVar("T")


def constrained(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Callable[[], list[str]] | None = None,
    doc: str = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a numeric range or a dynamic set of allowed names, checked at load."""
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except RecipeError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise RecipeError(
                f"{path}: {value!r} is not allowed; use one of {', '.join(map(str, allowed))}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{path}: expected a list, got {type(value).__name__}")
        (item_type, *_) = get_args(tp)
        return tuple(_convert(v, item_type, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_data(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {tp!r} at {path}")


def _check_constraints(value: Any, field: dataclasses.Field, path: str) -> None:
    meta = field.metadata
    if value is None or not meta:
        return
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        for key, _, ok in bounds:
            bound = meta.get(key)
            if bound is not None and not ok(value, bound):
                allowed = describe_range(meta)
                raise RecipeError(f"{path}: {value} is out of range; allowed: {allowed}")
    choices = meta.get("choices")
    if choices is not None and value not in choices():
        raise RecipeError(
            f"{path}: {value!r} is not allowed; use one of {', '.join(sorted(choices()))}"
        )


def describe_range(meta: Mapping[str, Any]) -> str:
    parts = []
    for key, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{symbol} {meta[key]}")
    return " and ".join(parts)


def from_data(cls: type[T], data: Any, path: str) -> T:
    """Build dataclass ``cls`` from YAML data; any fault raises RecipeError naming ``path``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise RecipeError(
            f"{where}: unknown key; allowed keys here: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        field = fields[name]
        if (isinstance(value, Mapping) and dataclasses.is_dataclass(hints[name])
                and field.default_factory is not dataclasses.MISSING):
            # A written section starts from what leaving it out gives (quant.weight is
            # per-channel and signed), so `weight: {bits: 2}` changes the bits and nothing else.
            value = {**to_data(field.default_factory()), **value}
        converted = _convert(value, hints[name], key_path)
        _check_constraints(converted, fields[name], key_path)
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}" if path else str(err)) from None


def to_data(obj: Any) -> Any:
    """The plain-YAML form of a config dataclass (the inverse of :func:`from_data`)."""
    if dataclasses.is_dataclass(obj):
        # None always means "not set" in a recipe, so it is left out of the YAML
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, tuple | list):
        return [to_data(v) for v in obj]
    return obj


def field_docs(cls: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every field of ``cls``, nested sections flattened with dots."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for key, t, d, doc in field_docs(tp):
                rows.append((f"{f.name}.{key}", t, d, doc))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(to_data(f.default_factory()))
        else:
            default = "(required)"
        allowed = describe_range(f.metadata) if f.metadata else ""
        choices = f.metadata.get("choices") if f.metadata else None
        if choices is not None:
            allowed = "one of " + ", ".join(sorted(choices()))
        doc = f.metadata.get("doc", "") if f.metadata else ""
        type_name = _type_name(tp) + (f" ({allowed})" if allowed else "")
        rows.append((f.name, type_name, default, doc))
    return rows
