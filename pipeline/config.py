"""Typed dataclass configs loaded strictly from YAML.

Every config is a tree of dataclasses whose fields carry defaults and a comment; a YAML file holds only what
differs. A file may name one other file as its `base` (a path relative to the file): the base is read first
(bases chain) and the file is merged over it, mappings key by key, every other value (lists included) replaced.
Loading is strict: after merging, an unknown key, a missing required key or a value of the wrong type is a
`ConfigError` naming the dotted key and the file (or `--set` override) that gave it. `--set a.b=value` overrides
are parsed as YAML scalars and checked the same way.

    cfg = load_config(TeacherExperimentConfig, "configs/street/teacher.yaml", overrides=["train.epochs=3"])
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

T = TypeVar("T")
_FLOAT_PATTERN = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
BASE_KEY = "base"  # top-level key of a config file: the file it is merged over


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from the YAML file at `path` (with its bases; or from defaults) and apply `key=value` overrides."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        data, origins = _read_with_bases(Path(path), ())
    for item in overrides:
        key = _apply_override(data, item)
        for replaced in [k for k in origins if k.startswith(f"{key}.")]:
            del origins[replaced]
        origins[key] = f"--set {item}"
    return from_dict(cls, data, source=source, origins=origins)


def load_config_data(path: str | Path) -> dict[str, Any]:
    """The mapping a config file gives once its bases are merged in (what `load_config` checks and builds)."""
    return _read_with_bases(Path(path), ())[0]


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's mapping merged over its base chain (`chain`: the files built on it so far), and the file that
    gave each dotted key."""
    named = Path(os.path.normpath(path))
    if any(named.resolve() == built.resolve() for built in chain):
        files = " -> ".join(str(p) for p in (*chain, named))
        raise ConfigError(f"{chain[-1]}: base {str(named)!r} is already in this file's base chain ({files}), a "
                          f"cycle; remove one of the base keys")
    data = _read_yaml(named)
    base = data.pop(BASE_KEY, None)
    origins = {key: str(named) for key in _dotted_keys(data)}
    if base is None:
        return data, origins
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{named}: key {BASE_KEY!r}: expected the path of a YAML file relative to this file, "
                          f"found {base!r}")
    base_path = Path(os.path.normpath(named.parent / base))
    if not base_path.is_file():
        raise ConfigError(f"{named}: base file {base!r} not found (looked for {base_path}); give a path relative to "
                          f"the folder of {named}")
    base_data, base_origins = _read_with_bases(base_path, (*chain, named))
    return _merge(base_data, data), {**base_origins, **origins}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file (see configs/)")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}: {exc}); fix the syntax") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(loaded).__name__}")
    return loaded


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged onto `base`: mappings key by key, any other value (a list, a scalar, null) replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, dotted))
    return keys


def _origin(source: str, origins: Mapping[str, str] | None, key: str) -> str:
    """The file (or override) that gave dotted `key` or its nearest given parent; `source` when none did."""
    if not origins:
        return source
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    while parts:
        found = origins.get(".".join(parts))
        if found is not None:
            return found
        parts.pop()
    return source


def _apply_override(data: dict[str, Any], item: str) -> str:
    """Set `item` (KEY=VALUE) in `data`; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not a valid YAML scalar or list ({exc})") from exc
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


def from_dict(cls: type[T], data: Any, source: str = "<dict>", prefix: str = "",
              origins: Mapping[str, str] | None = None) -> T:
    """Strictly convert a nested mapping into the dataclass `cls`; `origins` (dotted key -> the file or override
    that gave it) lets an error name the file a key came from rather than `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_origin(source, origins, prefix)}: key {prefix or '<root>'!r}: expected a mapping for "
                          f"{cls.__name__}, found {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    retired = getattr(cls, "RETIRED_KEYS", {})  # keys of configs written by earlier versions (a run's config.yaml)
    for name in [key for key in unknown if key in retired]:
        if data[name] != retired[name]:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{_origin(source, origins, where)}: key {where!r} is no longer a setting: only "
                              f"{retired[name]!r} remains, found {data[name]!r}; remove the key")
        unknown.remove(name)  # the only value that remains: ignored
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{_origin(source, origins, where)}: unknown key {where!r}; {cls.__name__} accepts "
                          f"{sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source, dotted, origins)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {dotted!r} ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {exc}") from exc


def _convert(tp: Any, value: Any, source: str, key: str, origins: Mapping[str, str] | None = None) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key, origins)
    named = _origin(source, origins, key)  # the file (or --set) that gave this value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, key, origins)
            except ConfigError:
                continue
        raise ConfigError(f"{named}: key {key!r}: expected {_type_name(tp)}, found {value!r}")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{named}: key {key!r}: expected one of {list(allowed)}, found {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{named}: key {key!r}: expected a list ({_type_name(tp)}), found {value!r}")
        args = get_args(tp)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(args[0], v, source, f"{key}[{i}]", origins) for i, v in enumerate(value))
            if len(args) != len(value):
                raise ConfigError(f"{named}: key {key!r}: expected {len(args)} values, found {len(value)}")
            return tuple(_convert(a, v, source, f"{key}[{i}]", origins)
                         for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        return [_convert(inner, v, source, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{named}: key {key!r}: expected a mapping, found {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(kt, k, source, key, origins): _convert(vt, v, source, f"{key}.{k}", origins)
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_PATTERN.fullmatch(value.strip()):
            # YAML 1.1 reads `1e-3` (no dot) as a string; users mean the number.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{named}: key {key!r}: expected a number, found {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{named}: key {key!r}: expected an integer, found {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{named}: key {key!r}: expected true or false, found {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{named}: key {key!r}: expected a string, found {value!r}")
        return value
    raise ConfigError(f"{named}: key {key!r}: unsupported config type {tp!r}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):  # `int | Literal["auto"]` -> "int or 'auto'"
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in get_args(tp))
    if origin is typing.Literal:
        return " or ".join(repr(value) for value in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-data form of a config (for manifests and checkpoints); tuples become lists."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML (every field, so a run directory records exactly what ran)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
