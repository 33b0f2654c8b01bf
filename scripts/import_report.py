"""Count the package's own imports that break the layers contract of pyproject.toml, the function-local ones
and the files over 400 lines: `python scripts/import_report.py [PACKAGE_PARENT_DIR]` (default: the repo).

The layers are read from the first ``layers`` contract of ``[tool.importlinter]``, so the same numbers can be
taken of an older checkout (pass its directory) against today's contract. lint-imports enforces the contract;
this script only measures.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layers() -> list[list[str]]:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    spec = next(c for c in contracts if c["type"] == "layers" and "containers" not in c)["layers"]
    return [[name.strip() for name in layer.split("|")] for layer in spec]


def layer_of(module: str, order: list[list[str]]) -> tuple[int, str] | None:
    """(layer index, 0 = top; the sibling it belongs to) of a module, or None when no layer holds it."""
    for index, siblings in enumerate(order):
        for sibling in siblings:
            if module == sibling or module.startswith(sibling + "."):
                return index, sibling
    return None


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, module: str):
    """(imported chatforge module, whether inside a function, line) of every import statement."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("chatforge"):
                for alias in child.names:  # `from chatforge.data import pipeline` imports a module
                    yield f"{child.module}.{alias.name}" if child.module.count(".") < 2 else child.module, inner, child
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("chatforge"):
                        yield alias.name, inner, child
            yield from visit(child, inner)
    yield from visit(tree, False)


def main() -> None:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    order = layers()
    upward, sideways, local, long_files = [], [], [], []
    for path in sorted((base / "chatforge").rglob("*.py")):
        module = module_name(path, base)
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 400:
            long_files.append(f"{path.relative_to(base)} ({text.count(chr(10))} lines)")
        seen = set()
        for target, in_function, node in imports(ast.parse(text), module):
            if in_function and f"{module}:{node.lineno}" not in {row.split(" ")[0] for row in local}:
                local.append(f"{module}:{node.lineno} -> {target}")
            mine, theirs = layer_of(module, order), layer_of(target, order)
            if mine is None or theirs is None or (module, target) in seen:
                continue
            seen.add((module, target))
            if theirs[0] < mine[0]:
                upward.append(f"{module} -> {target}")
            elif theirs[0] == mine[0] and theirs[1] != mine[1]:
                sideways.append(f"{module} -> {target}")
    for title, rows in (("upward imports", upward), ("imports between independent siblings", sideways),
                        ("function-local imports of chatforge modules", local), ("files over 400 lines", long_files)):
        print(f"{title}: {len(rows)}")
        for row in rows:
            print(f"    {row}")


if __name__ == "__main__":
    main()
