"""The documents stay true to the code: docs/objectives.md names every objective and parameter,
the README's layout lists every module, and every shipped recipe loads and says how to run it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from lightopd import objectives as O
from lightopd.config import TrainConfig
from lightopd.layering import load_recipe, shipped_recipes, train_settings
from lightopd.options import options

ROOT = Path(__file__).resolve().parent.parent


def test_objectives_document_names_every_objective_and_parameter():
    text = (ROOT / "docs" / "objectives.md").read_text()
    for name, objective in O.OBJECTIVES.items():
        assert f"`{name}`" in text, name
        for o in options(objective.Params):
            assert f"`{o.key.rstrip('_')}`" in text, (name, o.key)


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    for path in sorted((ROOT / "lightopd").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        assert re.search(rf"\b{re.escape(path.stem)}\.py\b", layout), f"README's Layout misses {path}"


def test_readme_counts_the_bad_input_table():
    from tests.test_bad_input import CASES

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"as a table of {len(CASES)} cases" in readme


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_recipe_loads_and_says_how_to_run_it(name):
    path = shipped_recipes()[name]
    text = path.read_text()
    assert text.startswith("# ") and "lightopd train " in text and f"--recipe {name}" in text
    cfg, params = train_settings({"student": "s", "data": "d", "out": "o"}, load_recipe(name))
    assert isinstance(cfg, TrainConfig) and isinstance(params, O.OBJECTIVES[cfg.objective].Params)
    assert tomllib.loads(text)["objective"]["name"] == cfg.objective


def test_recipes_folder_of_a_checkout_is_the_shipped_one():
    assert sorted(p.name for p in (ROOT / "recipes").glob("*.toml")) == sorted(
        p.name for p in shipped_recipes().values())
