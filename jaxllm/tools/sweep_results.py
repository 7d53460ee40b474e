"""A sweep's results as they come: results.csv and results.md (the best trial marked), the metric
against each parameter and every trial's validation curve as PNGs."""

from __future__ import annotations

import csv
import pathlib
from typing import Any

from jaxllm.training import metrics as metrics_lib


def counted(study) -> list:
  """Trials that count towards the asked number: all but failed (and surplus) ones."""
  import optuna

  states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
  return study.get_trials(deepcopy=False, states=states)


def finished(study) -> list:
  import optuna

  return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                  optuna.trial.TrialState.PRUNED))


# --- Results --------------------------------------------------------------------------------


def results(study, spec: dict) -> list[dict[str, Any]]:
  """One row per counted trial: number, state, parameters, metric, seconds, best, workdir."""
  import optuna

  complete = [t for t in study.get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.COMPLETE]
  pick = min if spec["direction"] == "minimize" else max
  best = pick(complete, key=lambda t: t.value).number if complete else None
  rows = []
  for t in counted(study):
    last = max(t.intermediate_values) if t.intermediate_values else None
    value = t.value if t.state == optuna.trial.TrialState.COMPLETE else (
        t.intermediate_values[last] if last is not None else None)
    rows.append({"trial": t.number, "state": t.state.name.lower(), **t.params,
                 spec["metric"]: value, "seconds": t.user_attrs.get("seconds"),
                 "best": t.number == best, "workdir": t.user_attrs.get("workdir", "")})
  return rows


def write_results(study, spec: dict, sweep_dir: pathlib.Path) -> None:
  rows = results(study, spec)
  if not rows:
    return
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(sweep_dir / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  lines = [f"## Sweep {study.study_name}: {spec['metric']} ({spec['direction']}), "
           f"{spec['sampler']} sampler, pruner {spec['pruner']}", "",
           "| " + " | ".join(c for c in columns if c != "best") + " |",
           "|" + "---|" * (len(columns) - 1)]
  for row in rows:
    cells = [_cell(row.get(c)) for c in columns if c != "best"]
    if row["best"]:
      cells[0] = f"**{cells[0]} (best)**"
    lines.append("| " + " | ".join(cells) + " |")
  (sweep_dir / "results.md").write_text("\n".join(lines) + "\n")
  _plots(rows, spec, sweep_dir)


def _cell(value: Any) -> str:
  if value is None:
    return ""
  return f"{value:.6g}" if isinstance(value, float) else str(value)


def _plots(rows: list[dict], spec: dict, sweep_dir: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metric = spec["metric"]
  for key in spec["params"]:
    points = [(row.get(key), row[metric], row["state"]) for row in rows
              if row.get(key) is not None and row[metric] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for state, marker in (("complete", "o"), ("pruned", "x")):
      chosen = [(x, y) for x, y, s in points if s == state]
      if chosen:
        ax.scatter(*zip(*chosen), marker=marker, label=state)
    if isinstance(spec["params"][key], dict) and spec["params"][key]["type"] == "loguniform":
      ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(sweep_dir / f"{metric}_vs_{key}.png", dpi=100)
    plt.close(fig)
  _curves(rows, sweep_dir, plt)


def _curves(rows: list[dict], sweep_dir: pathlib.Path, plt) -> None:
  """Every trial's validation loss against steps, from its metrics.jsonl."""

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row in rows:
    path = pathlib.Path(row["workdir"]) / "metrics.jsonl" if row["workdir"] else None
    if path is None or not path.is_file():
      continue
    records = metrics_lib.read_metrics(path)
    points = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if points:
      ax.plot(*zip(*points), "o-" if row["best"] else "-", markersize=3,
              label=f"trial {row['trial']}" + (" (best)" if row["best"] else ""))
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(sweep_dir / "curves.png", dpi=100)
  plt.close(fig)
