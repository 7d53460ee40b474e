"""What `pip install -e .` brings: every package jaxllm imports is a declared dependency, in a
compatible range, and constraints.txt pins the exact tested set."""

import ast
import importlib.metadata
import pathlib
import re
import sys

import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _normalized(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
  return _normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group())


def _project() -> dict:
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _imported_modules() -> dict[str, str]:
  """Top-level module -> the first jaxllm file importing it, over every import statement
  (inside functions too: the subcommands import some on first use)."""
  modules = {}
  for path in sorted((REPO / "jaxllm").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      else:
        continue
      for name in names:
        modules.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
  return modules


def _importers(module: str) -> list[str]:
  """The jaxllm files importing top-level `module` anywhere."""
  found = []
  for path in sorted((REPO / "jaxllm").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
               [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
      if any(name.split(".")[0] == module for name in names):
        found.append(str(path.relative_to(REPO)))
        break
  return found


# Packages of an optional extra that jaxllm imports, each from the one file that needs it
# (which turns its absence into a one-line error naming the extra); nothing else imports them.
EXTRA_IMPORTS = {"lm_eval": ("eval", "jaxllm/eval/harness.py")}


def test_every_imported_package_is_a_dependency():
  declared = {_requirement_name(r) for r in _project()["dependencies"]}
  distributions = importlib.metadata.packages_distributions()
  missing = []
  for module, where in _imported_modules().items():
    if module in sys.stdlib_module_names or module in ("jaxllm", "__future__"):
      continue
    if module in EXTRA_IMPORTS:
      extra, path = EXTRA_IMPORTS[module]
      assert _importers(module) == [path], f"{module}, of the {extra} extra"
      assert _normalized(module) in {_requirement_name(r)
                                     for r in _project()["optional-dependencies"][extra]}
      continue
    names = {_normalized(d) for d in distributions.get(module, [module])}
    if not names & declared:
      missing.append(f"{module} ({where}; distribution {sorted(names)})")
  assert not missing, missing


def test_dependencies_are_ranges_and_constraints_pin_them():
  requirements = _project()["dependencies"] + [
      r for extra in _project()["optional-dependencies"].values() for r in extra]
  assert not [r for r in requirements if "==" in r.split(";")[0]]  # installable beside others
  pins = {}
  for line in (REPO / "constraints.txt").read_text().splitlines():
    if line and not line.startswith("#"):
      name, version = line.split("==")
      pins[_normalized(name)] = version
  for requirement in requirements:
    name = _requirement_name(requirement)
    if "sys_platform == 'darwin'" in requirement:
      continue  # macOS's tensorflow; the constraints are Linux's
    assert name in pins, requirement
  assert (pins["jax"], pins["jaxlib"]) == (importlib.metadata.version("jax"),
                                           importlib.metadata.version("jaxlib"))
