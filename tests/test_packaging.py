"""Packaging: every package on disk is listed for setuptools (a regular install, as in Docker, has only those),
and the stage folders import one way: toolkit never imports export or deploy; export never imports deploy."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"toolkit": "lftk", "export": "lftk.export", "deploy": "lftk.deploy"}


def test_every_package_dir_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = set()
    for folder, name in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            on_disk.add(".".join((name, *rel)))
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder,forbidden", [
    ("toolkit", ("lftk.export", "lftk.deploy")),
    ("export", ("lftk.deploy",)),
    # the runtime core every stage imports: it may load models, never reach into training or evaluation
    ("toolkit/runtime", ("lftk.export", "lftk.deploy", "lftk.train", "lftk.eval", "lftk.sim")),
])
def test_arrows_point_one_way(folder, forbidden):
    bad = {
        f"{path.relative_to(REPO)}: {name}"
        for path in (REPO / folder).rglob("*.py")
        if path != REPO / "toolkit" / "cli.py"  # the command dispatcher: lazy imports of each stage's entry point
        for name in _imports(path)
        if name.startswith(forbidden)
    }
    assert not bad
