"""Module and function sizes of the jaxllm package: the largest of each, and every one over the
limits (a module over 400 lines, a function over 60). Exits 1 if any is over.

    python scripts/code_sizes.py [--top N]
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxllm"
MODULE_LINES, FUNCTION_LINES = 400, 60


def sizes() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
  """([(lines, module)], [(lines, module:function)]), largest first."""
  modules, functions = [], []
  for path in sorted(PACKAGE.rglob("*.py")):
    source = path.read_text()
    name = str(path.relative_to(PACKAGE.parent))
    modules.append((len(source.splitlines()), name))
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
  return sorted(modules, reverse=True), sorted(functions, reverse=True)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--top", type=int, default=5)
  top = parser.parse_args().top
  modules, functions = sizes()
  over = ([m for m in modules if m[0] > MODULE_LINES]
          + [f for f in functions if f[0] > FUNCTION_LINES])
  print(f"{len(modules)} modules, largest: " + ", ".join(f"{n} {m}" for n, m in modules[:top]))
  print(f"{len(functions)} functions, longest: "
        + ", ".join(f"{n} {f}" for n, f in functions[:top]))
  for lines, name in over:
    print(f"over the limit: {name}, {lines} lines")
  return 1 if over else 0


if __name__ == "__main__":
  sys.exit(main())
