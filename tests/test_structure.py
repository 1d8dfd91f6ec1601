"""The house's plan, kept by a test: the import graph of src/ read with ``ast``.

Every module sits on a floor; it may import only from floors below its own (so there is no circle
and no arrow back up), only at the top of the file, and the CLI on the roof is imported by nothing.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cambackdoor"
FLOORS = [
    ["errors", "version", "stats", "distributed", "legacy"],
    ["config", "models", "gradcam", "images"],
    ["triggers", "checkpoints", "data"],
    ["metrics"],
    ["explainers", "losses", "recipes"],
    ["figures", "audit_tables"],
    ["training", "evaluation"],
    ["implant_run"],
    ["implant_loop", "defences", "detectors"],
    ["implant", "audit", "sweep"],
    ["report"],
    ["pipeline"],
    ["__init__"],  # the package's facade: build_model, load_model, grad_cam, ...
    ["cli.common"],
    ["cli.train", "cli.evaluate", "cli.implant", "cli.pipeline", "cli.audit"],
    ["cli.__init__"],
    ["cli.__main__"],
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}
IMPLANT_PATH = ("implant", "implant_loop", "implant_run", "losses", "recipes")  # where no function may run over 60 lines


def _modules():
    for f in sorted(SRC.rglob("*.py")):
        yield ".".join(f.relative_to(SRC).with_suffix("").parts), f


def _imports(tree):
    """(module imported, node) for every import of our own package; ``from pkg import sub`` names the
    submodule, ``from pkg import name`` the package's ``__init__``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cambackdoor":
            package = node.module.removeprefix("cambackdoor").lstrip(".")
            for alias in node.names:
                sub = f"{package}.{alias.name}".lstrip(".")
                if sub in FLOOR:
                    yield sub, node
                elif f"{package}.__init__".lstrip(".") in FLOOR:
                    yield f"{package}.__init__".lstrip("."), node
                else:
                    yield package, node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cambackdoor":
                    yield alias.name.removeprefix("cambackdoor").lstrip(".") or "__init__", node


def test_every_module_has_a_floor():
    assert {name for name, _ in _modules()} == set(FLOOR), "add the new module to FLOORS (and keep it below its users)"


@pytest.mark.parametrize("name,path", list(_modules()), ids=[n for n, _ in _modules()])
def test_imports_go_down_and_sit_at_the_top(name, path):
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for target, node in _imports(tree):
        assert id(node) in top, f"{name}:{node.lineno} imports cambackdoor.{target} inside a function; import at the top"
        assert target in FLOOR, f"{name} imports unknown module {target}"
        assert FLOOR[target] < FLOOR[name], (f"{name} (floor {FLOOR[name]}) imports {target} (floor {FLOOR[target]}): "
                                             "imports must go down")


@pytest.mark.parametrize("name,path", list(_modules()), ids=[n for n, _ in _modules()])
def test_files_are_short_and_the_implant_path_has_short_functions(name, path):
    lines = path.read_text().splitlines()
    assert len(lines) <= 350, f"{name} has {len(lines)} lines; split it (350 at most)"
    if name in IMPLANT_PATH:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{name}.{node.name} has {length} lines; split it into named steps (60 at most)"


def test_the_floor_checker_catches_an_arrow_back_up():
    tree = ast.parse("from cambackdoor.cli import main\nimport cambackdoor.pipeline\n")
    found = [target for target, _ in _imports(tree)]
    assert found == ["cli.__init__", "pipeline"]
    assert FLOOR["cli.__init__"] > FLOOR["training"]  # so training importing the CLI would fail above
