"""Strict YAML -> dataclass loading, composition of base files, dotted overrides.

- An unknown key is an error naming the key, its section and the closest valid key.
- A value of the wrong type is an error naming the field and the expected type.
- ``include: [a.yaml, b.yaml]`` at the top of a file composes base files (paths relative to the
  including file, or to the ``configs/`` root); later files and the including file win.
- ``section.key=value`` overrides (value parsed as YAML) are applied last.
- A key given twice in one mapping of a file is an error naming the file, key and lines.
- NaN is refused for every float field (infinities are left to each section's checks).
After construction, each dataclass's ``validate()`` (if any) runs its cross-field checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Type, TypeVar, Union

import yaml

T = TypeVar("T")

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the field."""


# ---------------------------------------------------------------------------------------------
# YAML files and composition


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(f"{node.start_mark.name}: duplicate key '{key}' (line {key_node.start_mark.line + 1}; "
                              f"first at line {seen[key]})")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_StrictLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_include(ref: str, base_dir: Path) -> Path:
    for cand in (base_dir / ref, CONFIG_ROOT / ref, Path(ref)):
        if cand.exists():
            return cand
    raise ConfigError(f"include '{ref}' not found (looked in {base_dir} and {CONFIG_ROOT})")


def deep_merge(base: dict, over: dict) -> dict:
    """Recursive merge of mappings; ``over`` wins; lists are replaced, not concatenated."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_tree(path: Union[str, Path], _seen: Optional[set] = None) -> dict:
    """Read a YAML file and its includes (recursively) into one merged mapping."""
    path = Path(path).resolve()
    seen = set() if _seen is None else _seen
    if path in seen:
        raise ConfigError(f"include cycle through {path}")
    seen = seen | {path}
    data = _read_yaml(path)
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for ref in includes:
        merged = deep_merge(merged, load_yaml_tree(_resolve_include(ref, path.parent), seen))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple:
    """``a.b.c=value`` -> (['a','b','c'], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict, overrides: Iterable[str]) -> dict:
    tree = dict(tree)
    for ov in overrides:
        parts, value = parse_override(ov)
        node = tree
        for p in parts[:-1]:
            nxt = node.get(p)
            nxt = dict(nxt) if isinstance(nxt, dict) else {}
            node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return tree


# ---------------------------------------------------------------------------------------------
# Typed construction


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, List):
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(arg)}]"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, where: str) -> Any:
    """``value`` checked (and for floats, converted) against the annotation ``tp``; ConfigError
    naming ``where`` otherwise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, where)
    if origin is typing.Literal:
        return _convert_literal(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, List, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        arg = args[0] if args else Any
        return [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        return _SCALARS[tp](value, where)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _convert_union(value: Any, tp, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return _convert(value, a, where)
        except ConfigError:
            pass
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _convert_literal(value: Any, tp, where: str) -> Any:
    allowed = typing.get_args(tp)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}{hint}")
    return value


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected bool, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected int, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if number != number:  # NaN is never a meaningful setting (and slips through `x <= 0` checks)
        raise ConfigError(f"{where}: expected a number, got NaN")
    return number


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected str, got {value!r}")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def from_dict(cls: Type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly (see module docstring)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    section = where or "<root>"
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown key '{key}' in section '{section}'{hint}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    obj = cls(**kwargs)
    return obj


def validate_tree(obj: Any) -> None:
    """Run ``validate()`` on every dataclass in the tree, children first."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        validate_tree(getattr(obj, f.name))
    check = getattr(obj, "validate", None)
    if callable(check):
        check()


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def dump_yaml(obj: Any, path: Union[str, Path]) -> None:
    """Write the resolved config (e.g. into the run directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)
