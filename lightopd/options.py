"""Options declared once: a dataclass field carries its default, its help text and its flag.

Every stage config and every objective's parameters are dataclasses whose fields are declared
with `opt(...)`. The command line (cli.py), recipes and `--set` all read these declarations, so
an option's name, default and meaning are written in one place. Nested configs (a model spec, a
sampling spec) are flattened into one namespace of keys: a nested field keeps its own name, except
one marked `parent_name`, which takes the name of the field holding the nested config (the path
of the model under `student` is `--student`). Imports nothing heavy, so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

from lightopd.errors import InputError

_META = "lightopd"
MIN_TEMPERATURE = 1e-3  # logits / T stay finite in float32 (0 is greedy decoding, where it applies)


@dataclass(frozen=True)
class Doc:
    """How a field shows up on the command line."""

    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    parent_name: bool = False  # named after the field that holds its dataclass (ModelSpec.path -> --student)
    argument: bool = False  # positional instead of --flag
    cli: bool = True  # False: settable by recipe/--set/code only (not a flag)
    at_end: bool = False  # listed after the other options in --help (how to run, not what to do)


def opt(default: Any = MISSING, help: str = "", **doc: Any) -> Any:
    """A dataclass field with its default and documentation (see Doc for the keywords)."""
    return dataclasses.field(default=default, metadata={_META: Doc(help, **doc)})


def check(ok: bool, option: str, message: str) -> None:
    """InputError('OPTION: MESSAGE') unless `ok`."""
    if not ok:
        raise InputError(f"{option}: {message}")


def parse_worker(spec: str) -> tuple[int, int]:
    """`--worker I/N` -> (I, N), with 0 <= I < N."""
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"--worker: expected I/N (e.g. 0/4), got {spec!r}") from None
    check(count >= 1 and 0 <= index < count, "--worker", f"expected 0 <= I < N, got {spec!r}")
    return index, count


def flag_of(key: str) -> str:
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class Option:
    """One leaf option of a (possibly nested) config dataclass."""

    key: str  # the flat name: a recipe / --set key, the flag without dashes (with '_' for '-')
    path: tuple[str, ...]  # attribute path in the nested config, e.g. ("student", "path")
    kind: type  # bool, int, float, str
    optional: bool  # None is allowed
    default: Any  # MISSING when required
    doc: Doc

    @property
    def flag(self) -> str:
        return flag_of(self.key)

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def repeatable(self) -> bool:
        """A tuple of strings, given as a repeated flag (or a list in a recipe)."""
        return typing.get_origin(self.kind) is tuple


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(type, optional) of an annotation such as `int | None` or `Optional[str]`."""
    args = typing.get_args(annotation)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def options(cls: type, path: tuple[str, ...] = (), parent: str | None = None, parent_doc: Doc | None = None
            ) -> list[Option]:
    """The flat list of `cls`'s options, nested dataclasses included; keys are unique. The option
    named after its parent field is documented by the parent's help followed by its own."""
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in fields(cls):
        kind, optional = _unwrap(hints[f.name])
        doc = f.metadata.get(_META) or Doc("")
        if is_dataclass(kind):
            out += options(kind, (*path, f.name), f.name, doc)
            continue
        key = f.name
        if doc.parent_name and parent:
            key = parent
            if parent_doc is not None and parent_doc.help:
                doc = dataclasses.replace(doc, help=f"{parent_doc.help} {doc.help}")
            if parent_doc is not None and parent_doc.argument:
                doc = dataclasses.replace(doc, argument=True)
        out.append(Option(key, (*path, f.name), kind, optional, f.default, doc))
    keys = [o.key for o in out]
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    assert duplicate is None, f"{cls.__name__}: option {duplicate!r} is declared twice"
    return out


def build(cls: type, values: dict[str, Any], prefix: str = "--") -> Any:
    """An instance of `cls` from flat `values` (keys as in `options`); absent keys keep defaults.
    A non-finite number is refused whatever the option (`prefix` + key names it)."""
    by_path = {o.path: o.key for o in options(cls)}
    unknown = sorted(set(values) - set(by_path.values()))
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {unknown[0]!r}")
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            name = prefix + (key.replace("_", "-") if prefix == "--" else key.rstrip("_"))
            raise InputError(f"{name}: must be a finite number, got {value}")
    return _build(cls, values, by_path, ())


def _build(cls: type, values: dict, by_path: dict, path: tuple[str, ...]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        kind, optional = _unwrap(hints[f.name])
        here = (*path, f.name)
        if is_dataclass(kind) and optional and _absent(kind, values, by_path, here):
            kwargs[f.name] = None
        elif is_dataclass(kind):
            kwargs[f.name] = _build(kind, values, by_path, here)
        elif by_path[here] in values:
            kwargs[f.name] = values[by_path[here]]
    return cls(**kwargs)


def _absent(kind: type, values: dict, by_path: dict, path: tuple[str, ...]) -> bool:
    """Whether an optional nested config is left out: its required option (the one named after it)
    is not given. Then its other options must not be given either."""
    mine = {k: p for p, k in by_path.items() if p[:len(path)] == path}
    required = [k for k, p in mine.items() if _leaf(kind, p[len(path):]).default is MISSING]
    if any(values.get(k) is not None for k in required):
        return False
    for key, p in mine.items():
        if key not in required and key in values and values[key] != _leaf(kind, p[len(path):]).default:
            raise InputError(f"{flag_of(key)}: only with {', '.join(map(flag_of, required))}")
    return True


def _leaf(kind: type, path: tuple[str, ...]) -> dataclasses.Field:
    f = {f.name: f for f in fields(kind)}[path[0]]
    return f if len(path) == 1 else _leaf(typing.get_type_hints(kind)[path[0]], path[1:])


def flatten(config: Any) -> dict[str, Any]:
    """The flat {key: value} of a config instance: the inverse of `build`."""
    out = {}
    for o in options(type(config)):
        value = config
        for name in o.path:
            value = MISSING if value is None or value is MISSING else getattr(value, name)
        # an option of a nested config left out: None for the option that names it, else the default
        out[o.key] = value if value is not MISSING else (None if o.required else o.default)
    return out


def coerce(where: str, value: Any, o: Option) -> Any:
    """`value` (from TOML or a --set string) as option `o`'s type, or InputError naming `where`."""
    if value is None and o.optional:
        return None
    kind = o.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif o.repeatable:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    raise InputError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def metavar(o: Option) -> str | None:
    """The placeholder shown after the flag: declared, or the choices."""
    return o.doc.metavar or ("|".join(o.doc.choices) if o.doc.choices else None)


def describe(o: Option) -> str:
    """The option's help text, with its choices."""
    text = o.doc.help
    if o.doc.choices:
        text += f" One of: {', '.join(o.doc.choices)}."
    return text
