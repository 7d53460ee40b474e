"""The package's shape: imports point one way (no circles, counting imports inside functions),
and the public API is what `import jaxllm` gives."""

import ast
import importlib
import importlib.util
import pathlib
import re
import subprocess
import sys

import jaxllm
import jaxllm.config

PACKAGE = pathlib.Path(jaxllm.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = ("jaxllm",) + path.relative_to(PACKAGE).with_suffix("").parts
    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


def import_graph() -> dict[str, set[str]]:
  """module -> the jaxllm modules it imports anywhere in its file (at the top or inside a
  function). `from P import m` of a submodule m is an import of P.m; importing P.m also runs
  P's __init__, which counts unless P is the importer's own package (being imported already)."""
  modules = _modules()
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    if path.name == "__init__.py":
      own.add(name)
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        submodules = [f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in modules]
        targets = submodules or [node.module]
      for target in targets:
        if not target.startswith("jaxllm"):
          continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the module and the packages above it
          prefix = ".".join(parts[:i])
          if prefix in modules and prefix not in own and prefix != name:
            graph[name].add(prefix)
  return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_circle_finder_sees_a_circle_through_a_function_import():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert circles(graph) == [["a", "b", "c"]]
  assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
  graph = import_graph()
  assert "jaxllm.tasks" in graph["jaxllm.eval.report"]  # the report builds the run's task
  assert {"jaxllm.models.gpt", "jaxllm.training.step"} <= graph["jaxllm.tasks.lm"]
  assert circles(graph) == []


def test_ruff_finds_nothing():
  """The lint rules of pyproject.toml ([tool.ruff]) hold everywhere: `ruff check .`."""
  repo = PACKAGE.parent
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=repo,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_modules_and_functions_are_short():
  """scripts/code_sizes.py: no module over 400 lines, no function over 60."""
  result = subprocess.run([sys.executable, "scripts/code_sizes.py"], cwd=PACKAGE.parent,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
  assert "largest: " in result.stdout


def test_the_configuration_page_is_current():
  """docs/configuration.md is generated from the defaults' comments; regenerate it when a key
  changes (python scripts/config_reference.py)."""
  result = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"],
                          cwd=PACKAGE.parent, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  page = (PACKAGE.parent / "docs" / "configuration.md").read_text()
  config = jaxllm.config.default_config()
  for section, keys in config.items():
    for key in keys.keys():
      assert f"| `{section}.{key}` |" in page, (section, key)


_IMPORT = re.compile(r"^\s*from (jaxllm(?:\.\w+)*) import (?:\(([^)]*)\)|([\w ,]+))"
                     r"|^\s*import (jaxllm(?:\.\w+)+)", re.MULTILINE)


def jaxllm_imports(text: str) -> set[tuple[str, str | None]]:
  """(module, name) for every `from jaxllm... import name` and (module, None) for every
  `import jaxllm.x` in a text: code, a test's subprocess script, or a docs page's example."""
  found = set()
  for match in _IMPORT.finditer(text):
    if match.group(4):
      found.add((match.group(4), None))
      continue
    names = re.sub(r"#[^\n]*", "", match.group(2) or match.group(3))
    for name in names.replace("\n", " ").split(","):
      name = name.split(" as ")[0].strip()
      if name:
        found.add((match.group(1), name))
  return found


def test_the_import_finder_reads_both_forms():
  text = ('x = """\nfrom jaxllm.training import metrics, sharding as s\n"""\n'
          "  import jaxllm.cli\nfrom jaxllm import (\n  cli,  # noqa: E402\n  config)\n")
  assert jaxllm_imports(text) == {("jaxllm.training", "metrics"), ("jaxllm.training", "sharding"),
                                  ("jaxllm.cli", None), ("jaxllm", "cli"), ("jaxllm", "config")}


def test_every_jaxllm_import_written_anywhere_resolves():
  """Imports in tests' subprocess scripts, scripts/, benchmarks/, experiments/ and the docs are
  strings no linter follows; when a module moves, each must still name a real module or name."""
  repo = PACKAGE.parent
  places = [repo / "README.md", *repo.glob("docs/**/*.md"), *repo.glob("launch/**/*"),
            *repo.glob("tests/**/*.py"), *repo.glob("scripts/**/*"), *repo.glob("benchmarks/**/*.py"),
            *repo.glob("experiments/**/*.py"), *PACKAGE.rglob("*.py")]
  seen, broken = 0, []
  for path in places:
    if not path.is_file() or path.suffix not in {".py", ".md", ".sh", ""}:
      continue
    for module, name in jaxllm_imports(path.read_text(errors="replace")):
      seen += 1
      try:
        imported = importlib.import_module(module)
      except ImportError as e:
        broken.append(f"{path.relative_to(repo)}: import {module}: {e}")
        continue
      if name and not hasattr(imported, name) and importlib.util.find_spec(f"{module}.{name}") is None:
        broken.append(f"{path.relative_to(repo)}: from {module} import {name}")
  assert seen > 100
  assert broken == []
