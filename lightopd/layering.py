"""`train`'s settings from four layers: defaults < recipe < `--set KEY=VALUE` < explicit flags.

A recipe is a TOML file (or the name of one shipped in lightopd/recipes/) with a `[train]` table
of training keys and an `[objective]` table holding `name` and the objective's parameters. Keys
are the option names of `lightopd train --help` with `_` for `-` (`lr`, `adam_beta2`, `dtype`);
objective parameters are `objective.<name>` in `--set`. A later layer wins key by key, and
`steps` and `epochs` replace each other: a recipe's `epochs` with a `--steps` flag means steps.
A recipe's objective parameters are kept only while its objective is the one that trains.
"""

from __future__ import annotations

from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from lightopd.config import TrainConfig
from lightopd.errors import InputError
from lightopd.objectives import ALIASES, ObjectiveParams, lookup
from lightopd.options import build, coerce, options
from lightopd.progress import warn

EXCLUSIVE = {"steps": "epochs", "epochs": "steps"}


def shipped_recipes() -> dict[str, Path]:
    """The recipes shipped with lightopd, by name."""
    folder = resources.files("lightopd") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def load_recipe(spec: str) -> dict:
    """The tables of a recipe given as a file path or as the name of a shipped recipe."""
    path = Path(spec)
    if path.is_dir():
        raise InputError(f"--recipe {spec}: is a directory; give a recipe's .toml file or a shipped recipe's name")
    if not path.is_file():
        shipped = shipped_recipes()
        name = path.name.removesuffix(".toml")
        if name not in shipped or path.parent != Path("."):
            raise InputError(f"--recipe {spec}: no such file, and no shipped recipe of that name "
                             f"(shipped: {', '.join(sorted(shipped))})")
        path = shipped[name]
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"--recipe {spec}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--recipe {spec}: not UTF-8 text (byte {e.start + 1})") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"--recipe {spec}: not valid TOML ({e})") from None
    misplaced = [key for key in ("train", "objective") if key in tables and not isinstance(tables[key], dict)]
    if misplaced:
        raise InputError(f"--recipe {spec}: {misplaced[0]!r} must be a table ([{misplaced[0]}] with keys under it), "
                         f"not a {type(tables[misplaced[0]]).__name__}")
    return tables


def parse_set(item: str) -> tuple[str, Any]:
    """`key=value` with a TOML value (numbers, true/false, quoted strings; bare words are strings)."""
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def _overlay(merged: dict, layer: dict, where: str) -> None:
    both = [k for k in EXCLUSIVE if k in layer]
    if len(both) == 2:
        raise InputError(f"{where}: steps and epochs both given; give one of them")
    for key in both:
        merged.pop(EXCLUSIVE[key], None)
    merged.update(layer)


def train_settings(flags: dict[str, Any], recipe: dict | None = None,
                   sets: list[tuple[str, Any]] = ()) -> tuple[TrainConfig, ObjectiveParams]:
    """TrainConfig and the objective's parameters from the layers; `flags` holds the options given
    explicitly on the command line (already typed), `recipe` a recipe's tables, `sets` the `--set`
    pairs. Unknown keys and values of the wrong type are errors naming the key."""
    train_options = {o.key: o for o in options(TrainConfig)}
    recipe = recipe or {}
    unknown = sorted(set(recipe) - {"train", "objective"})
    if unknown:
        raise InputError(f"recipe: unknown table [{unknown[0]}] (allowed: [train], [objective])")
    recipe_objective = dict(recipe.get("objective", {}))
    recipe_name = recipe_objective.pop("name", None)
    recipe_train = dict(recipe.get("train", {}))
    if recipe_name is not None:
        recipe_train["objective"] = recipe_name
    set_train = {k: v for k, v in sets if not k.startswith("objective.")}
    set_objective = {k.removeprefix("objective."): v for k, v in sets if k.startswith("objective.")}

    merged: dict[str, Any] = {}
    for where, layer, typed in (("recipe", recipe_train, False), ("--set", set_train, False),
                                ("flags", flags, True)):
        checked = {}
        for key, value in layer.items():
            if key not in train_options:
                settable = sorted(train_options)
                raise InputError(f"unknown training key {key!r} (valid: {', '.join(settable)}; objective "
                                 "parameters are set as objective.<name>)")
            checked[key] = value if typed else coerce(key, value, train_options[key])
        _overlay(merged, checked, where)
    name = merged.get("objective", TrainConfig.objective)
    objective = lookup(name)
    params: dict[str, Any] = {}
    if recipe_objective and recipe_name is not None and recipe_name != name:
        warn(f"the recipe's [objective] parameters are for {recipe_name}, not {name}; they are not used")
    elif recipe_objective:
        params.update(recipe_objective)
    params.update(set_objective)
    return build(TrainConfig, merged), objective_params(objective.Params, name, params)


def objective_params(cls: type[ObjectiveParams], name: str, values: dict[str, Any]) -> ObjectiveParams:
    """`cls` from {parameter: value} as a recipe or --set spells them."""
    by_name = {o.key: o for o in options(cls)}
    out = {}
    for key, value in values.items():
        field_name = ALIASES.get(key, key)
        if field_name not in by_name:
            valid = ", ".join(sorted(f.name.rstrip("_") for f in fields(cls)))
            raise InputError(f"objective.{key}: not a parameter of {name} (valid: {valid})")
        out[field_name] = coerce(f"objective.{key}", value, by_name[field_name])
    return build(cls, out, prefix="objective.")
