"""TOML training configurations as nested dataclasses, checked before anything runs.

A command declares its configuration as dataclasses (a table per nested dataclass) and calls
`load_config(path, Schema)`. Unknown keys, values of the wrong type and values a section's
`check()` refuses raise ConfigError naming the dotted key, e.g. `model.channel_mult`.
Supported field types: bool, int, float, str, lists of those, fixed-length tuples, `X | None`,
`dict` (free-form tables) and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from ldmfast._values import is_integer, is_number

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that is refused before training starts; `key` is the dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def check_device(device: str, key: str = "device") -> None:
    """A training or synthesis device: auto, cpu, cuda or cuda:N."""
    if device != "auto" and device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(key, f"must be auto, cpu, cuda or cuda:N, got {device!r}")


def unloadable_model(key: str, message: str, description: str) -> ConfigError:
    """A model folder that would not load, refused as the setting `key` that names it: `message`,
    then the first two lines of the error's `description` (torch lists every mismatched weight:
    the first says enough) and how many more there were."""
    lines = description.strip().splitlines() or [description]
    more = f" (and {len(lines) - 2} more lines)" if len(lines) > 2 else ""
    return ConfigError(key, f"{message}: {' '.join(line.strip() for line in lines[:2])}{more}")


def check_finite_at_least(key: str, value: float, low: float, *, strict: bool = False) -> None:
    """Refuse a value that is not a finite number >= low (> low when strict), naming `key`; the
    comparison is written so that NaN fails it too."""
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        raise ConfigError(key, f"must be a finite number {'>' if strict else '>='} {low:g}, got {value}")


def check_model_section(section: str, validate) -> None:
    """Run a model config's `validate()`, turning its ModelConfigError (key, message) into a
    ConfigError naming `section.key`."""
    try:
        validate()
    except ValueError as err:
        key = getattr(err, "key", None)
        if key is None:
            raise
        raise ConfigError(f"{section}.{key}", str(err).split(": ", 1)[1]) from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str) -> Any:
    """`value` (from TOML) as type `tp`, or ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:  # tuple[X, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(key, f"expected a list, got {value!r}")
            return tuple(_convert(v, items[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(key, f"expected a list of {len(items)} values, got {value!r}")
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if not is_integer(value):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if not is_number(value):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if math.isnan(value):  # (TOML has nan; no setting means anything by it)
            raise ConfigError(key, "expected a number, got nan")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported configuration type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a (TOML) dict, recursively; missing keys take their defaults.
    Calls the instance's `check(prefix)` if it has one."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dotted = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(dotted(unknown[0]), f"unknown key; {cls.__name__} knows {', '.join(sorted(fields))}")
    values = {}
    for name, value in data.items():
        values[name] = _convert(value, hints[name], dotted(name))
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(dotted(missing[0]), "required key is missing")
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        check(prefix)
    return instance


def to_dict(instance) -> dict:
    """The dataclass as plain, TOML/JSON-compatible values (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(instance))


def set_dotted(data: dict, assignment: str) -> None:
    """Apply one `--set section.key=value` override to a TOML dict; value is TOML (`3`, `[1, 2]`,
    `"text"`, `true`); a bare word that is not TOML is taken as a string."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", f"--set expects KEY=VALUE, got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parents[:i + 1]), "is not a table")
    node[last] = value


def read_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("", f"{path} is not valid TOML: {err}") from None


def load_config(path: str | os.PathLike, cls: type[T], overrides: list[str] = ()) -> T:
    """Read a TOML file into dataclass `cls`, after applying `--set` style overrides."""
    data = read_toml(path)
    for assignment in overrides:
        set_dotted(data, assignment)
    return from_dict(cls, data)
