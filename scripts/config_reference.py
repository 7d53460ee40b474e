"""docs/configuration.md: every config key, its default and what it does, read from the
defaults' own comments (jaxllm/config/defaults.py), so the page cannot drift from the code.

    python scripts/config_reference.py           # rewrites docs/configuration.md
    python scripts/config_reference.py --check   # exit 1 if the page is not current
"""

from __future__ import annotations

import argparse
import ast
import io
import pathlib
import sys
import tokenize

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULTS = REPO / "jaxllm" / "config" / "defaults.py"
PAGE = REPO / "docs" / "configuration.md"

HEADER = """# Configuration

Every key of `default_config()` (jaxllm/config/defaults.py), by section: its default and
what it does, from the comments beside the code. An experiment file changes some of them;
the command line overrides any as `--config.SECTION.KEY=VALUE` (a key that does not exist is
a one-line error); a run records the whole resolved config in `DIR/config.json`. This page is
generated: `python scripts/config_reference.py` (a test checks it is current).
"""


def _comments(source: str) -> dict[int, str]:
  """line number -> the text of the comment on it."""
  return {token.start[0]: token.string.lstrip("#").strip()
          for token in tokenize.generate_tokens(io.StringIO(source).readline)
          if token.type == tokenize.COMMENT}


def _key(target: ast.expr) -> str | None:
  """`s.key` or `s["key"]` (for keys that are Python words) -> key."""
  if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
    return target.attr if target.value.id == "s" else None
  if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
      and target.value.id == "s" and isinstance(target.slice, ast.Constant)):
    return target.slice.value
  return None


def sections(source: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
  """[(section, [(key, default as written, comment)])] in default_config's order."""
  tree, comments = ast.parse(source), _comments(source)
  lines = source.splitlines()
  functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
  order = [stmt.value.func.id for stmt in functions["default_config"].body
           if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call)
           and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id.startswith("_")]
  out = []
  for name in order:
    rows, above = [], []
    for stmt in functions[name].body:
      for line in range(stmt.lineno - 1, 0, -1):  # the comment lines right above a key
        if lines[line - 1].strip().startswith("#"):
          above.insert(0, comments[line])
        else:
          break
      key = _key(stmt.targets[0]) if isinstance(stmt, ast.Assign) else None
      if key is not None:
        inline = comments.get(stmt.end_lineno, "")
        if lines[stmt.end_lineno - 1].strip().startswith("#"):
          inline = ""
        text = " ".join(part for part in (" ".join(above), inline) if part)
        rows.append((key, ast.get_source_segment(source, stmt.value), text))
      above = []
    out.append((name.lstrip("_"), rows))
  return out


def page() -> str:
  text = io.StringIO()
  text.write(HEADER)
  for section, rows in sections(DEFAULTS.read_text()):
    text.write(f"\n## `{section}`\n\n| key | default | |\n|---|---|---|\n")
    for key, default, comment in rows:
      default = default.replace("|", "\\|").replace("\n", " ")
      text.write(f"| `{section}.{key}` | `{default}` | {comment.replace('|', chr(92) + '|')} |\n")
  return text.getvalue()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if the page is not current")
  wanted = page()
  if parser.parse_args().check:
    current = PAGE.read_text() if PAGE.is_file() else ""
    if current != wanted:
      print(f"{PAGE} is not current: run python scripts/config_reference.py", file=sys.stderr)
      return 1
    return 0
  PAGE.parent.mkdir(exist_ok=True)
  PAGE.write_text(wanted)
  print(f"wrote {PAGE}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
