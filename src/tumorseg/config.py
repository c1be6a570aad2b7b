"""Typed, strict configuration: defaults, then a TOML file, then `key=value` overrides.

Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from tumorseg.errors import TumorsegInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _check(value: Any, tp: Any, key: str, where: str | None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, key, where)
            except TumorsegInputError:
                pass
        raise TumorsegInputError(where, f"key {key!r}: {value!r} is not of type {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TumorsegInputError(where, f"key {key!r}: expected a table, got {value!r}")
        return from_dict(tp, value, where, prefix=f"{key}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TumorsegInputError(where, f"key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise TumorsegInputError(where, f"key {key!r}: expected {len(args)} values, got {value!r}")
        item = args[0] if args else Any
        items = [_check(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TumorsegInputError(where, f"key {key!r}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise TumorsegInputError(where, f"key {key!r}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise TumorsegInputError(where, f"key {key!r}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str | None = None, prefix: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TumorsegInputError(where, f"unknown key {prefix + unknown[0]!r}; valid keys: {sorted(names)}")
    try:
        defaults = cls()
    except TypeError:
        defaults = None
    kwargs = {}
    for k, v in data.items():
        default = getattr(defaults, k, None)
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            v = {**dataclasses.asdict(default), **v}  # a partial table keeps this field's defaults
        kwargs[k] = _check(v, hints[k], prefix + k, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TumorsegInputError(where, f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'phase1.epochs=3' -> (['phase1', 'epochs'], 3); values are TOML literals, else strings."""
    if "=" not in text:
        raise TumorsegInputError(None, f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(cls, path: str | Path | None = None, overrides: list[str] = ()):
    """Defaults of `cls`, updated by the TOML file at `path`, then by `key=value` overrides."""
    data: dict = {}
    where = str(path) if path else None
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise TumorsegInputError(path, "config file does not exist") from None
        except IsADirectoryError:
            raise TumorsegInputError(path, "is a folder, not a TOML config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise TumorsegInputError(path, f"not valid TOML: {exc}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise TumorsegInputError(None, f"override {text!r}: {k!r} is not a table")
        node[keys[-1]] = value
    return from_dict(cls, data, where)
