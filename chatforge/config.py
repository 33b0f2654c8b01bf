"""One config system for every stage.

Each stage describes its options as a dataclass whose fields carry a ``help`` string in their metadata.
Values come, in increasing priority, from the dataclass defaults, a TOML/YAML file given with
``--config FILE``, and ``--key=value`` (or ``--key value``) on the command line. Nested dataclasses are
addressed with dots (``--model.n_layer=4``). Unknown keys and badly typed values raise ``ConfigError``
naming the offending key, so a typo never silently falls back to a default.

Numbers are range-checked where they are parsed: ``option(..., ge=, gt=, le=, lt=)`` declares an option's
bounds, and without a declared lower bound an integer option must be >= 0 (every count, size, step and seed in
chatforge is) and a float option must be finite (``nan`` and ``inf`` are never meant).
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from chatforge import io
from chatforge.errors import ChatforgeError, ConfigError

T = TypeVar("T")


COMPARISONS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
               "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, **kwargs) -> Any:
    """A dataclass field with a help string (shown by ``chatforge <stage> --help``) and optional numeric bounds
    (checked on every number the option holds, list items included)."""
    bounds = {name: bound for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if bound is not None}
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _bounds(field: dataclasses.Field, tp: Any) -> dict[str, float]:
    """The declared bounds of an option, with the defaults for numbers: integers >= 0 unless declared otherwise."""
    bounds = dict(field.metadata.get("bounds", {}))
    tp, _ = _unwrap_optional(tp)
    item_tp = (typing.get_args(tp) or (None,))[0] if typing.get_origin(tp) in (list, tuple) else tp
    if item_tp is int and "ge" not in bounds and "gt" not in bounds:
        bounds["ge"] = 0
    return bounds


def check_bounds(key: str, value: Any, bounds: dict[str, float]) -> None:
    """ConfigError naming ``key`` unless every number in ``value`` is finite and within ``bounds``."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"option '{key}' must be a finite number; got {item}")
        for name, bound in bounds.items():
            symbol, holds = COMPARISONS[name]
            if not holds(item, bound):
                raise ConfigError(f"option '{key}' must be {symbol} {bound}; got {item}")


def check_option_bounds(cfg: Any, prefix: str = "") -> None:
    """ConfigError naming the first option of ``cfg`` (nested sections included) that is out of its bounds."""
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_option_bounds(value, prefix + f.name + ".")
        else:
            check_bounds(prefix + f.name, value, _bounds(f, hints[f.name]))


def describe_bounds(bounds: dict[str, float]) -> str:
    return ", ".join(f"{COMPARISONS[name][0]} {bound}" for name, bound in bounds.items())


def nested(cls: type, help: str = "") -> Any:
    """A field holding another config dataclass."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Turn a string (CLI) or parsed file value into the field's declared type."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"option '{key}' may not be empty")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                return int(float(value)) if any(c in value for c in "eE.") else int(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            return str(value)
        if origin in (list, tuple):
            (item_tp, *_rest) = typing.get_args(tp) or (str,)
            items = value
            if isinstance(value, str) and value.strip().startswith("["):
                items = json.loads(value)  # --inputs='["a b.txt", "c,d.jsonl"]': names with commas or spaces
                if not isinstance(items, list):
                    raise ValueError(value)
            elif isinstance(value, str):
                items = [v for v in (s.strip() for s in value.split(",")) if v] if value.strip() else []
            if not isinstance(items, (list, tuple)):
                raise ValueError(value)
            return [_coerce(key, v, item_tp) for v in items]
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if typing.get_origin(tp) is typing.Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                raise ConfigError(f"option '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise ConfigError(f"option '{key}' expects {getattr(tp, '__name__', tp)}; got {value!r}") from None
    return value


def _assign(cfg: Any, dotted: str, value: Any, *, full_key: str | None = None) -> None:
    if not isinstance(dotted, str):  # a YAML or TOML key may be a number, a date, a boolean...
        raise ConfigError(f"option names are text; got {dotted!r}" + (f" in section '{full_key}'" if full_key else ""))
    full_key = full_key or dotted
    head, _, rest = dotted.partition(".")
    head = head.replace("-", "_")
    if keyword.iskeyword(head):  # `--as` sets the field `as_`: Python names cannot be keywords
        head += "_"
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if head not in fields:
        known = ", ".join(sorted(_flat_keys(type(cfg))))
        raise ConfigError(f"unknown option {full_key!r} for {type(cfg).__name__}; known options: {known}")
    current = getattr(cfg, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _assign(current, rest, value, full_key=full_key)
            return
        if not isinstance(value, dict):
            raise ConfigError(f"option '{full_key}' is a section; set its keys as {full_key}.<key>")
        for k, v in value.items():
            _assign(current, k, v, full_key=f"{full_key}.{k}")
        return
    if rest:
        raise ConfigError(f"unknown option {full_key!r}: '{head}' has no sub-options")
    setattr(cfg, head, _coerce(full_key, value, _field_types(type(cfg))[head]))


def _flat_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _flat_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def load_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a TOML, YAML or JSON file (a config, a safety policy) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"{what} {path}: use a .toml, .yaml or .json file")
    text = io.read_text(path, what)
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
            data = {} if data is None else data
    except Exception as exc:  # parse errors of the three formats have no common base class
        raise ConfigError(f"{what} {path} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level; got {type(data).__name__}")
    odd = [key for key in data if not isinstance(key, str)]
    if odd:  # YAML allows any key ("? " alone is a null one); options are named by strings
        raise ConfigError(f"{what} {path} has a key that is not a name: {odd[0]!r}")
    return data


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """A ``cls`` with every key of ``values`` (possibly nested dicts or dotted keys) set, checked as options are."""
    cfg = cls()
    for key, value in values.items():
        _assign(cfg, key, value)
    check_option_bounds(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def split_overrides(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """Split ``argv`` into (config file, ``--key=value`` overrides, positional arguments).

    ``--flag`` alone means ``--flag=true``; ``--key value`` works when the value does not start with ``--``.
    """
    config_file = None
    overrides: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional += argv[i + 1 :]
            break
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if nxt is not None and not nxt.startswith("--"):
                    value = nxt
                    i += 1
                else:
                    value = "true"
            if key == "config":
                config_file = value
            else:
                overrides[key] = value
        else:
            positional.append(arg)
        i += 1
    return config_file, overrides, positional


def parse(cls: type[T], argv: list[str], *, allow_positional: bool = False) -> tuple[T, list[str]]:
    """Build a ``cls`` config from ``--config FILE`` and ``--key=value`` arguments."""
    config_file, overrides, positional = split_overrides(argv)
    if positional and not allow_positional:
        raise ConfigError(f"unexpected argument(s): {' '.join(positional)} (options are written --key=value)")
    cfg = cls()
    if config_file:
        for key, value in load_file(config_file).items():
            try:
                _assign(cfg, key, value)
            except ConfigError as exc:
                raise ConfigError(f"config file {config_file}: {exc}") from None
    for key, value in overrides.items():
        _assign(cfg, key, value)
    try:
        check_option_bounds(cfg)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ChatforgeError as exc:
        if config_file:
            raise ConfigError(f"{exc} (options from {config_file} and the command line)") from None
        raise
    return cfg, positional


def help_text(cls: type, prefix: str = "") -> str:
    """Every option of ``cls`` with its type, default and help string."""
    lines = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"  [{prefix}{f.name}] {f.metadata.get('help', '')}".rstrip())
            lines.append(help_text(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tname = getattr(_unwrap_optional(tp)[0], "__name__", str(tp))
        name = f.name[:-1] if keyword.iskeyword(f.name[:-1]) else f.name
        bounds = describe_bounds(_bounds(f, tp))
        lines.append(f"  --{prefix}{name}={default!r}  ({tname}{', ' + bounds if bounds else ''})\n"
                     f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def die(message: str) -> typing.NoReturn:
    """Print ``message`` as one line (a parser's multi-line report joined, control characters escaped) and exit 2."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    line = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in line)
    print(f"chatforge: error: {line}", file=sys.stderr)
    raise SystemExit(2)
