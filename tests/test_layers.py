"""The package's import arrows point one way (DESIGN.md's layers), read from the source, not by importing."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mindflux"

# package -> packages it must never import (at module level or inside a function)
FORBIDDEN = {
    "adapters": {"models", "lora", "pipelines", "training"},
    "models": {"lora", "pipelines", "training"},
    "lora": {"models", "pipelines", "training"},
}


def imported_packages(path: Path) -> set[str]:
    """The first component under mindflux/ of every module a file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("mindflux", "lora", "formats")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(own[:-node.level])  # a module's package is own[:-1]; each level goes up one
                names = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:  # `from . import x`: x is a module of that package
                    names = [".".join(base + [alias.name]) for alias in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mindflux" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_import_reader_resolves_relative_imports():
    assert imported_packages(PACKAGE / "models" / "single_file.py") >= {"key_conversion"}
    assert "adapters" in imported_packages(PACKAGE / "models" / "transformer_flux.py")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_one_way(package):
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        bad = imported_packages(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(PACKAGE.parent)} imports mindflux.{', mindflux.'.join(sorted(bad))}")
    assert not offenders, "imports against the layers:\n" + "\n".join(offenders)
