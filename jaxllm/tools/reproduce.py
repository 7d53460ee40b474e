"""`jaxllm reproduce`: the figures an experiment expects against those a run of it obtained.

An experiment file's `EXPECTED` maps a figure of the run's eval.json to a check and, last,
where the expected figure comes from:

    EXPECTED = {"val_loss": ("<=", 1.88, "nanoGPT README: 1.8857 at step 2,000"),
                "initial_val_loss": ("between", 10.7, 11.1, "the book, ch. 5: 10.99")}

Checks: "<=", "<", ">=", ">", "==" against one value, "between" two (inclusive). `reproduce`
trains the experiment (or reads its finished run), prints a table of expected against
obtained with pass / fail per row, and writes it as reproduce.md in the run directory. A
finished run is read only if it was made from the same config (the experiment's with the
overrides, as recorded in its request.json); otherwise it is trained again from scratch.

`reproduce_all` does that for every experiment of a folder (`--cpu`: those marked
`CPU = True`, sized for a 2-core CPU), in an order that honours `REQUIRES = ("other",)`
(experiments whose runs this one starts from), giving each its data as
`data.path=<data dir>/<DATA>`, and writes one report.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import pathlib
from typing import Any, Sequence

from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.training import loop as trainer

CHECKS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
          "==": operator.eq, "between": lambda x, low, high: low <= x <= high}


@dataclasses.dataclass
class Row:
  figure: str
  check: str  # e.g. "<= 1.88"
  obtained: float | None
  passed: bool
  source: str


def expectations(expected: dict, where: str) -> list[tuple[str, str, tuple, str]]:
  """(figure, check, bounds, source) of each EXPECTED entry; a malformed one is an error."""
  rows = []
  for figure, spec in expected.items():
    spec = tuple(spec)
    source = spec[-1] if spec and isinstance(spec[-1], str) and len(spec) > 2 else ""
    check, bounds = spec[0], spec[1:len(spec) - (1 if source else 0)]
    if check not in CHECKS or len(bounds) != (2 if check == "between" else 1):
      raise JaxllmError(f"{where}: EXPECTED['{figure}'] = {spec!r} is not (check, value[, "
                        f"value], source) with check one of {', '.join(CHECKS)}")
    rows.append((figure, check, bounds, source))
  return rows


def compare(expected: dict, figures: dict[str, Any], where: str = "EXPECTED") -> list[Row]:
  """One row per expected figure: its check, the run's figure, pass or fail (a figure the
  run lacks fails)."""
  rows = []
  for figure, check, bounds, source in expectations(expected, where):
    obtained = figures.get(figure)
    text = f"{check} {' and '.join(f'{b:g}' for b in bounds)}"
    passed = isinstance(obtained, (int, float)) and bool(CHECKS[check](obtained, *bounds))
    rows.append(Row(figure, text, obtained if isinstance(obtained, (int, float)) else None,
                    passed, source))
  return rows


def markdown(title: str, rows: Sequence[Row]) -> str:
  lines = [f"## {title}", "", "| figure | expected | obtained | result | source |",
           "|---|---|---|---|---|"]
  for row in rows:
    obtained = "missing" if row.obtained is None else f"{row.obtained:.6g}"
    lines.append(f"| `{row.figure}` | {row.check} | {obtained} | "
                 f"{'pass' if row.passed else '**FAIL**'} | {row.source} |")
  passed = sum(row.passed for row in rows)
  return "\n".join(lines + ["", f"{passed} of {len(rows)} pass."]) + "\n"


REQUEST_FILE = "request.json"


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in values.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def changed_keys(workdir: pathlib.Path, request: dict) -> list[str] | None:
  """The keys in which the finished run in `workdir` was asked for differently from
  `request` ([] if it is the same run; None if it has no record of what it was asked)."""
  path = workdir / REQUEST_FILE
  if not path.is_file():
    return None
  try:
    before = _flat(json.loads(path.read_text()))
  except json.JSONDecodeError:
    return None
  now = _flat(json.loads(json.dumps(request)))  # JSON's types: tuples as lists
  return [f"{key}={now.get(key)!r} (was {before.get(key)!r})"
          for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]


def reproduce(experiment: str | pathlib.Path, workdir: str | pathlib.Path | None = None,
              overrides: Sequence[str] = (), rerun: bool = False,
              progress: bool = True) -> list[Row]:
  """Runs `experiment` into `workdir` (default runs/<name>) unless a finished run is there
  (or `rerun`), compares its eval.json with EXPECTED, prints and writes reproduce.md."""
  experiment = pathlib.Path(experiment)
  module, config = config_lib.load_experiment(experiment)
  expected = getattr(module, "EXPECTED", None)
  if not expected:
    raise JaxllmError(f"{experiment} has no EXPECTED figures to check")
  expectations(expected, str(experiment))  # a malformed entry fails before training
  config_lib.apply_overrides(config, overrides)
  workdir = pathlib.Path(workdir or pathlib.Path("runs") / experiment.stem)
  figures_path = workdir / "eval.json"
  request = config_lib.to_dict(config)
  changed = changed_keys(workdir, request) if figures_path.is_file() else None
  if rerun or changed != []:

    if figures_path.is_file() and not rerun:
      why = (f"it was made with other settings: {', '.join(changed[:3])}"
             f"{f' and {len(changed) - 3} more' if len(changed) > 3 else ''}"
             if changed else f"it has no {REQUEST_FILE} saying what it was made from")
      print(f"training {workdir} again from scratch: {why}")
    if figures_path.is_file() or rerun:  # another run's checkpoints are no place to resume
      config.checkpoint.resume = False
    trainer.run(config, workdir, progress=progress)
    (workdir / REQUEST_FILE).write_text(json.dumps(request, indent=2) + "\n")
  else:
    print(f"reading the finished run in {workdir} (--rerun trains again)")
  rows = compare(expected, json.loads(figures_path.read_text()), str(experiment))
  report = markdown(f"{experiment.name}: {workdir}", rows)
  (workdir / "reproduce.md").write_text(report)
  print(report + f"written to {workdir / 'reproduce.md'}")
  return rows


def _ordered(modules: dict[str, Any]) -> list[str]:
  """Experiment names, each after those it REQUIRES (alphabetical otherwise)."""
  order: list[str] = []

  def visit(name: str, path: tuple[str, ...]) -> None:
    if name in order:
      return
    if name in path or name not in modules:
      raise JaxllmError(f"experiment '{path[-1]}' requires '{name}', which is "
                        f"{'a cycle' if name in path else 'not among the experiments run'}")
    for required in getattr(modules[name], "REQUIRES", ()):
      visit(required, path + (name,))
    order.append(name)

  for name in sorted(modules):
    visit(name, ())
  return order


def reproduce_all(folder: str | pathlib.Path = "experiments", *, cpu_only: bool = False,
                  data_dir: str | pathlib.Path | None = None, runs: str | pathlib.Path = "runs",
                  rerun: bool = False, progress: bool = True) -> dict[str, list[Row]]:
  """`reproduce` for every experiment in `folder` with EXPECTED figures (CPU-sized ones
  with `cpu_only`); one report, <runs>/reproduce.md."""
  folder, runs = pathlib.Path(folder), pathlib.Path(runs)
  modules = {}
  for path in sorted(folder.glob("*.py")):
    module, _ = config_lib.load_experiment(path)
    if getattr(module, "EXPECTED", None) and (getattr(module, "CPU", False) or not cpu_only):
      modules[path.stem] = module
  if not modules:
    raise JaxllmError(f"no experiment in {folder} has EXPECTED figures"
                      f"{' and CPU = True' if cpu_only else ''}")
  results, sections = {}, []
  for name in _ordered(modules):
    data = getattr(modules[name], "DATA", "")
    if data and not data_dir:
      raise JaxllmError(f"{name} reads {data}: give --data-dir (the folder holding it)")
    overrides = [f"data.path={pathlib.Path(data_dir) / data}"] if data else []
    results[name] = reproduce(folder / f"{name}.py", runs / name, overrides, rerun=rerun,
                              progress=progress)
    sections.append(markdown(f"{name}.py: {runs / name}", results[name]))
  failed = [name for name, rows in results.items() if not all(row.passed for row in rows)]
  summary = (f"{len(results) - len(failed)} of {len(results)} experiments reproduce"
             + (f"; failing: {', '.join(failed)}" if failed else "") + ".\n")
  runs.mkdir(parents=True, exist_ok=True)
  (runs / "reproduce.md").write_text("# Reproduction report\n\n" + "\n".join(sections) +
                                     "\n" + summary)
  print(summary + f"written to {runs / 'reproduce.md'}")
  return results
