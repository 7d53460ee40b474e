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

`reproduce_seeds` runs the experiment once per seed (`train.seed`, into DIR/seed-S), checks
EXPECTED against the seeds' mean, and writes a table of every figure the runs share: mean,
standard deviation (n - 1), least and greatest, and each seed's value (the tokens-to-target
figures of `train.target_val_loss` among them).

`reproduce_all` does that for every experiment of a folder (`--cpu`: those marked
`CPU = True`, sized for a 2-core CPU), in an order that honours `REQUIRES = ("other",)`
(experiments whose runs this one starts from), giving each its data as
`data.path=<data dir>/<DATA>`, and writes one report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import pathlib
import statistics
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


def spread(figures: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """{figure: mean, std, min, max, values} of each number that every run's figures have."""
  shared = [k for k, v in figures[0].items() if isinstance(v, (int, float))
            and not isinstance(v, bool) and all(isinstance(f.get(k), (int, float)) for f in figures)]
  table = {}
  for key in shared:
    values = [float(f[key]) for f in figures]
    if not all(math.isfinite(v) for v in values):
      continue
    table[key] = {"mean": statistics.fmean(values),
                  "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "min": min(values), "max": max(values), "values": values}
  return table


def spread_markdown(title: str, seeds: Sequence[int], table: dict[str, dict]) -> str:
  lines = [f"## {title}: {len(seeds)} seeds", "",
           "| figure | mean | std | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---|---:|---:|---:|---:|" + "---:|" * len(seeds)]
  for key, row in table.items():
    cells = [f"{row[k]:.6g}" for k in ("mean", "std", "min", "max")]
    lines.append(f"| `{key}` | " + " | ".join(cells + [f"{v:.6g}" for v in row["values"]]) + " |")
  return "\n".join(lines) + "\n"


def reproduce_seeds(experiment: str | pathlib.Path, seeds: Sequence[int],
                    workdir: str | pathlib.Path | None = None, overrides: Sequence[str] = (),
                    rerun: bool = False, progress: bool = True) -> list[Row]:
  """`reproduce` once per seed into WORKDIR/seed-S; EXPECTED checked against the seeds'
  mean; the spread of every figure in WORKDIR/reproduce.md and seeds.json."""
  experiment = pathlib.Path(experiment)
  if len(set(seeds)) != len(seeds) or not seeds:
    raise JaxllmError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds")
  if any(o.partition("=")[0].strip() == "train.seed" for o in overrides):
    raise JaxllmError("--seeds sets train.seed for each run; leave out --config.train.seed")
  module, _ = config_lib.load_experiment(experiment)
  workdir = pathlib.Path(workdir or pathlib.Path("runs") / experiment.stem)
  figures = []
  for seed in seeds:
    run = workdir / f"seed-{seed}"
    reproduce(experiment, run, [*overrides, f"train.seed={seed}"], rerun=rerun,
              progress=progress)
    figures.append(json.loads((run / "eval.json").read_text()))
  table = spread(figures)
  rows = compare(getattr(module, "EXPECTED"), {k: v["mean"] for k, v in table.items()},
                 str(experiment))
  report = (markdown(f"{experiment.name}: {workdir}, the mean of {len(seeds)} seeds", rows)
            + "\n" + spread_markdown(experiment.name, seeds, table))
  (workdir / "reproduce.md").write_text(report)
  (workdir / "seeds.json").write_text(json.dumps({"seeds": list(seeds), "figures": table},
                                                 indent=1) + "\n")
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
