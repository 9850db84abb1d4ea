"""The layers depend one way: core -> model -> runtime -> export -> engines -> workflows -> serve -> cli,
declared in pyproject.toml's import-linter contracts and checked here, with no exceptions listed."""

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

from importlinter.cli import lint_imports

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def contracts() -> list[dict]:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]


def test_the_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(PYPROJECT.parent)  # the package is analysed from the source tree
    assert lint_imports(config_filename=str(PYPROJECT), no_cache=True) == 0  # the report names each broken import


def test_no_contract_lists_an_exception():
    assert contracts() and not [c["name"] for c in contracts() if c.get("ignore_imports") or c.get("unmatched_ignore_imports_alerting")]


def test_every_package_of_sejd_sits_in_a_layer():
    layers = next(c for c in contracts() if c["type"] == "layers")["layers"]
    packages = {f"sejd.{p.name}" for p in (PYPROJECT.parent / "sejd").iterdir()
                if (p / "__init__.py").exists()}
    modules = {f"sejd.{p.stem}" for p in (PYPROJECT.parent / "sejd").glob("*.py") if p.stem != "__init__"}
    assert packages | modules == set(layers)  # a new top-level module or package must be given its layer
