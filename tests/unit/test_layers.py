"""The package's layers, read from its imports with ``ast``: nothing reaches upward.

The gate sits on top; the features (turn, dedup, serialize, mailbox) take a
``Runtime`` and never import the gate; the engines in ``_backends`` import
neither the gate nor a feature; integrations in ``contrib`` use the public API
only. A new import that breaks a rule fails here, naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import inturn

SRC = Path(inturn.__file__).parent

# Modules allowed to import the gate: the public face and the programs on top of it.
GATE_USERS = {"__init__", "_cli", "_demo", "__main__", "_gate"}
FEATURES = {"_turn", "_turn_async", "_turn_sync", "_dedup", "_serialize", "_mailbox", "_gate"}


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (or in ``source``, read as
    if it were that file), relative ones resolved."""
    text = path.read_text() if source is None else source
    tree = ast.parse(text, filename=str(path))
    package = ".".join(("inturn", *path.relative_to(SRC).with_suffix("").parts))
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    else:
        package = package.removesuffix(".__init__")
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _top(module: str) -> str:
    """The first private part below ``inturn`` (``inturn._gate.Gate`` -> ``_gate``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "inturn" else ""


def test_only_the_top_imports_the_gate() -> None:
    """No module below the gate imports ``_gate``."""
    below = [p for p in _sources() if p.parent != SRC or p.stem not in GATE_USERS]
    offenders = [
        f"{path.relative_to(SRC)}:{line} imports {module}"
        for path in below
        for line, module in _imports(path)
        if _top(module) == "_gate"
    ]
    assert offenders == []


def test_engines_import_no_feature() -> None:
    """``_backends`` imports neither the gate nor a feature, only the contract and helpers."""
    offenders = [
        f"{path.relative_to(SRC)}:{line} imports {module}"
        for path in sorted((SRC / "_backends").rglob("*.py"))
        for line, module in _imports(path)
        if _top(module) in FEATURES or _top(module) == "_runtime"
    ]
    assert offenders == []


def test_contrib_uses_the_public_api_only() -> None:
    """Integrations import ``inturn`` and its public names, never ``inturn._*``."""
    offenders = [
        f"{path.relative_to(SRC)}:{line} imports {module}"
        for path in sorted((SRC / "contrib").rglob("*.py"))
        for line, module in _imports(path)
        if module.startswith(("inturn._", "inturn.contrib._"))
    ]
    assert offenders == []


def test_the_checker_sees_an_upward_import() -> None:
    """The rules above can fail: relative imports of the gate and of a feature resolve."""
    engine = SRC / "_backends" / "memory" / "_core.py"
    source = engine.read_text() + "\nfrom ..._gate import Gate\nfrom ... import _turn\n"
    found = {module for _, module in _imports(engine, source)}
    assert {"inturn._gate", "inturn._turn"} <= found
    assert _top("inturn._gate.Gate") == "_gate"


def test_no_source_file_is_huge() -> None:
    """Each module has one job: none is over 650 lines."""
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in _sources()}
    assert {name: n for name, n in sizes.items() if n > 650} == {}


def test_all_matches_what_the_package_exposes() -> None:
    """``__all__`` lists exactly the public names ``inturn`` has (lazy ones included)."""
    exposed = {
        name
        for name, value in vars(inturn).items()
        if not name.startswith("_") and not isinstance(value, type(inturn))
    }
    exposed |= set(inturn._LAZY) | {"__version__"}
    exposed -= {"annotations"}
    assert set(inturn.__all__) == exposed
