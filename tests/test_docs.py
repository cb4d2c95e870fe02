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


def test_layout_lists_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    for path in sorted((ROOT / "lightopd").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        assert re.search(rf"\b{re.escape(path.stem)}\.py\b", layout), f"docs/layout.md misses {path}"


def test_reliability_counts_the_bad_input_table():
    from tests.test_bad_input import CASES

    text = " ".join((ROOT / "docs" / "reliability.md").read_text().split())
    assert f"as a table of {len(CASES)} cases" in text


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


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_of_the_documents_resolves():
    """Each relative link in README.md and docs/*.md names a file or folder of the checkout, and an
    anchor names a heading of its page."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    anchors = {page.resolve(): {_anchor(line.lstrip("#")) for line in page.read_text().splitlines()
                                if line.startswith("#")} for page in pages}
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page.resolve()
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors.get(resolved, set()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
