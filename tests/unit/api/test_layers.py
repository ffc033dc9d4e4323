"""Dependencies point one way: the web layer (loop/api) imports the domain, never the reverse.

Every module under loop/ is parsed with `ast` (nothing is imported or run) and each import it makes, at any
depth (inside functions and `if TYPE_CHECKING:` too), is resolved to a module name. Only loop/api itself and the
builders at the top (loop/cli/serve.py, which serves the app, and loop/bench/, which starts it to measure it)
may import loop.api. A failure names each offending module, line and import.

Run: .venv/bin/python -m pytest -q tests/unit/api/test_layers.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "loop"
ALLOWED = ("loop.api", "loop.cli.serve", "loop.bench")  # these modules (and their submodules) may import loop.api


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imported(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, in line order; `from X import y` yields both X and X.y (y may
    be a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return sorted(found)


def upward_imports(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        if any(within(name, allowed) for allowed in ALLOWED):
            continue
        for line, target in imported(path, name):
            if within(target, "loop.api"):
                bad.append(f"{path.relative_to(package.parent).as_posix()}:{line} imports {target}")
    return bad


def test_the_domain_never_imports_the_web_layer() -> None:
    bad = upward_imports()
    assert not bad, ("the domain imports loop.api (raise loop.errors' errors and return values instead; only "
                     "loop/api maps them to HTTP):\n" + "\n".join(bad))


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The checker itself: absolute, from-, relative and nested imports of loop.api are all caught."""
    pkg = tmp_path / "loop"
    (pkg / "api").mkdir(parents=True)
    (pkg / "domain").mkdir()
    for init in (pkg / "__init__.py", pkg / "api" / "__init__.py", pkg / "domain" / "__init__.py"):
        init.write_text("")
    (pkg / "api" / "errors.py").write_text("from loop.domain import core\n")  # the API importing down: fine
    (pkg / "domain" / "core.py").write_text(
        "import loop.api.errors\n"
        "from loop import api\n"
        "from ..api.errors import ApiError\n"
        "def f():\n"
        "    from loop.api import deps\n"
        "import loop.apiary\n")  # a different package that only starts with the same letters
    assert upward_imports(pkg) == [
        "loop/domain/core.py:1 imports loop.api.errors", "loop/domain/core.py:2 imports loop.api",
        "loop/domain/core.py:3 imports loop.api.errors", "loop/domain/core.py:3 imports loop.api.errors.ApiError",
        "loop/domain/core.py:5 imports loop.api", "loop/domain/core.py:5 imports loop.api.deps"]
