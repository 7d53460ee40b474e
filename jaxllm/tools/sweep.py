"""`jaxllm sweep`: hyperparameter sweeps on an Optuna study, each trial an ordinary run.

A sweep is data: an experiment file's `SWEEP` dict, or the command line.

    SWEEP = {
        "params": {"train.learning_rate": [1e-3, 3e-3],                      # values: a grid
                   "model.n_layer": {"type": "int", "low": 1, "high": 4},    # or a distribution
                   "train.weight_decay": {"type": "loguniform", "low": 1e-3, "high": 0.3}},
        "metric": "val_loss", "direction": "minimize",
        "sampler": "grid",   # grid (every combination of listed values), random, tpe
        "trials": 6,         # default: the grid's size
        "pruner": "none",    # none, median or halving, on the evaluations during training
        "seed": 0,
        "grace_seconds": 30,  # a running trial silent this long is failed and retried
        "vectorize": 1,      # > 1: train this many trials at once (vectorized.KEYS only)
    }

The study lives in a real database: SQLite in the sweep directory by default, or any Optuna
storage URL (PostgreSQL, MySQL; `journal:PATH` for Optuna's journal file on a shared disk),
so several processes or machines can work on one sweep, each pulling the next trial. Trial
k trains in `<sweep dir>/trial_<k>`. A sweep killed and run again finishes only what is
missing: finished trials are never redone; a trial whose worker died is noticed by its
missing heartbeat (RDB storage), retried with the same parameters, and resumes from its own
checkpoints. No more trials complete than asked for, however many workers race for the last
ones. After every trial: results.csv and results.md (the best trial marked), the metric
against each parameter and every trial's validation curve as PNGs.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import pathlib
import time
import warnings
from typing import Any, Sequence

from jaxllm import config as config_lib
from jaxllm.errors import JaxllmError
from jaxllm.tools import preflight as preflight_lib
from jaxllm.tools import sweep_results, vectorized
from jaxllm.training import loop as trainer

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "halving")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "categorical")


class _Surplus(Exception):
  """A trial asked for when the sweep already had all it needs (workers raced for it)."""


def parse_param(text: str) -> tuple[str, Any]:
  """`key=v1,v2,...` (values) or `key=loguniform:1e-4:1e-2` (uniform, int, likewise)."""
  if "=" not in text:
    raise JaxllmError(f"--param '{text}' needs the form section.key=values or "
                      f"section.key=loguniform:low:high")
  key, spec = text.split("=", 1)
  kind, _, rest = spec.partition(":")
  if kind not in ("uniform", "loguniform", "int"):
    return key, [_literal(v) for v in spec.split(",")]
  if rest.count(":") != 1:
    raise JaxllmError(f"--param '{text}': needs {kind}:low:high (e.g. {kind}:1e-4:1e-2)")
  bounds = {}
  for name, value in zip(("low", "high"), rest.split(":")):
    bounds[name] = _literal(value)
    if not _is_number(bounds[name]):
      raise JaxllmError(f"--param '{text}': {name} '{value}' is not a number ({kind}:low:high, "
                        f"e.g. {kind}:1e-4:1e-2)")
  return key, {"type": kind, **bounds}


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def sweep_spec(module: Any, params: Sequence[str] = (), **options) -> dict:
  """The experiment's SWEEP, with --param entries and options (not None) on top."""
  spec = dict(getattr(module, "SWEEP", {}) or {})
  spec["params"] = {**spec.get("params", {}), **dict(parse_param(p) for p in params)}
  spec.update({k: v for k, v in options.items() if v is not None})
  spec.setdefault("metric", "val_loss")
  spec.setdefault("direction", "minimize")
  spec.setdefault("sampler", "grid" if all(isinstance(v, list)
                                           for v in spec["params"].values()) else "tpe")
  spec.setdefault("pruner", "none")
  spec.setdefault("seed", 0)
  spec.setdefault("grace_seconds", 30)
  spec.setdefault("vectorize", 1)
  _check_spec(spec)
  if "trials" not in spec:
    if spec["sampler"] != "grid":
      raise JaxllmError("a random or tpe sweep needs a number of trials (--trials N)")
    spec["trials"] = math.prod(len(v) for v in spec["params"].values())
  return spec


def _check_spec(spec: dict) -> None:
  if not spec["params"]:
    raise JaxllmError("the sweep has no parameters (SWEEP['params'] or --param key=values)")
  known = config_lib.default_config()
  for key, values in spec["params"].items():
    section, _, name = key.partition(".")
    if section not in known or name not in known[section]:
      raise JaxllmError(f"sweep parameter '{key}' is not a config key (section.key, e.g. "
                        f"train.learning_rate)")
    if isinstance(values, dict):
      _check_distribution(key, values)
    if spec["sampler"] == "grid" and not isinstance(values, list):
      raise JaxllmError(f"a grid sweep needs a list of values for '{key}', not a distribution")
  for name, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS),
                        ("direction", ("minimize", "maximize"))):
    if spec[name] not in allowed:
      raise JaxllmError(f"sweep {name} must be one of {', '.join(allowed)}, got "
                        f"'{spec[name]}'")


def _check_distribution(key: str, values: dict) -> None:
  """What Optuna would refuse mid-sweep (or as a KeyError), refused before the first trial."""
  kind = values.get("type")
  if kind not in DISTRIBUTIONS:
    raise JaxllmError(f"sweep parameter '{key}': type must be one of "
                      f"{', '.join(DISTRIBUTIONS)}, got {kind!r}")
  if kind == "categorical":
    if not isinstance(values.get("choices"), list) or not values["choices"]:
      raise JaxllmError(f"sweep parameter '{key}': a categorical needs a list of choices "
                        f"({{'type': 'categorical', 'choices': [...]}})")
    return
  low, high = values.get("low"), values.get("high")
  if not (_is_number(low) and _is_number(high)):
    raise JaxllmError(f"sweep parameter '{key}': {kind} needs numbers low and high, got "
                      f"{low!r} and {high!r}")
  if low > high:
    raise JaxllmError(f"sweep parameter '{key}': {kind} needs low <= high, got {low} and {high}")
  if kind == "loguniform" and low <= 0:
    raise JaxllmError(f"sweep parameter '{key}': a loguniform range needs 0 < low <= high, got "
                      f"{low} and {high}")


def _suggest(trial, key: str, values: Any) -> Any:
  if isinstance(values, list):
    return trial.suggest_categorical(key, values)
  if values["type"] == "categorical":
    return trial.suggest_categorical(key, values["choices"])
  if values["type"] == "int":
    return trial.suggest_int(key, int(values["low"]), int(values["high"]))
  return trial.suggest_float(key, float(values["low"]), float(values["high"]),
                             log=values["type"] == "loguniform")


def _storage(url: str, sweep_dir: pathlib.Path, grace_seconds: int):
  """The study's database. RDB storage (SQLite, PostgreSQL, MySQL) has heartbeats: a trial
  whose worker is silent for `grace_seconds` is failed and retried with its parameters."""
  import optuna

  if not url:
    url = f"sqlite:///{(sweep_dir / 'study.db').absolute()}"
  if url.startswith("journal:"):
    backend = optuna.storages.journal.JournalFileBackend(url[len("journal:"):])
    return optuna.storages.JournalStorage(backend)
  grace_seconds = max(int(grace_seconds), 2)
  with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=max(grace_seconds // 3, 1), grace_period=grace_seconds,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=3))


def make_study(spec: dict, name: str, sweep_dir: pathlib.Path, storage: str = ""):
  """The Optuna study of a sweep: created, or loaded when it exists (a rerun, a worker)."""
  import optuna
  import sqlalchemy

  seed = int(spec["seed"])
  if spec["sampler"] == "grid" and spec.get("vectorize", 1) > 1:
    # Optuna's GridSampler stops the study from inside tell(), which only works under
    # optimize(); vectorised groups ask and tell, so their grid points are enqueued instead.
    sampler = optuna.samplers.RandomSampler(seed=seed)
  elif spec["sampler"] == "grid":
    sampler = optuna.samplers.GridSampler(spec["params"], seed=seed)
  elif spec["sampler"] == "random":
    sampler = optuna.samplers.RandomSampler(seed=seed)
  else:
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, spec["trials"]))
  pruner = {"none": optuna.pruners.NopPruner(),
            "median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "halving": optuna.pruners.SuccessiveHalvingPruner()}[spec["pruner"]]
  sweep_dir.mkdir(parents=True, exist_ok=True)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  for attempt in range(5):
    try:
      return optuna.create_study(study_name=name,
                                 storage=_storage(storage, sweep_dir, spec["grace_seconds"]),
                                 sampler=sampler, pruner=pruner, direction=spec["direction"],
                                 load_if_exists=True)
    except sqlalchemy.exc.SQLAlchemyError:
      # Workers started together on a new database race to create its tables; the loser
      # finds them there on its next try.
      if attempt == 4:
        raise
      time.sleep(1.0 + attempt)


def _objective(config_path: pathlib.Path, overrides: Sequence[str], spec: dict,
               sweep_dir: pathlib.Path, progress: bool,
               fit: preflight_lib.Target | None = None):
  import optuna

  def objective(trial):
    # Trial numbers are handed out atomically: exactly `trials` of them rank below the limit.
    rank = sum(1 for t in sweep_results.counted(trial.study) if t.number < trial.number)
    if rank >= spec["trials"]:
      trial.study.stop()
      raise _Surplus()
    values = {key: _suggest(trial, key, v) for key, v in spec["params"].items()}
    config = config_lib.load_config(config_path)
    config_lib.apply_overrides(config, overrides)
    for key, value in values.items():
      section, name = key.split(".", 1)
      with config[section].ignore_type():
        config[section][name] = value
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    # A retry of a trial whose worker died trains on in that trial's directory.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      origin = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    workdir = sweep_dir / f"trial_{trial.number if origin is None else origin:03d}"
    trial.set_user_attr("workdir", str(workdir))
    print(f"trial {trial.number}: {values} -> {workdir}")
    if fit is not None:  # compiled for the slice first: a trial that cannot run never trains
      report = preflight_lib.preflight(config, fit)
      trial.set_user_attr("preflight_peak_bytes", max(p.peak_bytes for p in report.programs))
      if not report.fits:
        worst = max(report.programs, key=lambda p: (not p.fits, p.peak_bytes))
        reason = (worst.error or f"{worst.peak_bytes / 2**30:.3f} GiB a device > "
                  f"{report.memory_bytes / 2**30:.3f} GiB")
        print(f"trial {trial.number}: does not fit {fit.name} ({worst.name}: {reason}); pruned")
        raise optuna.TrialPruned(f"does not fit {fit.name}: {worst.name}: {reason}")

    def on_evaluation(step: int, figures: dict) -> None:
      if spec["pruner"] != "none" and spec["metric"] in figures:
        trial.report(figures[spec["metric"]], step)
        if trial.should_prune():
          raise optuna.TrialPruned(f"pruned at step {step}")

    start = time.perf_counter()
    figures = trainer.run(config, workdir, progress=progress, on_evaluation=on_evaluation)
    trial.set_user_attr("seconds", time.perf_counter() - start)
    if spec["metric"] not in figures:
      raise JaxllmError(f"sweep metric '{spec['metric']}' is not a figure of the run "
                        f"(it has: {', '.join(k for k in figures if not k.endswith('s'))})")
    return float(figures[spec["metric"]])
  return objective


def run(config_path: str | pathlib.Path, spec: dict, sweep_dir: str | pathlib.Path,
        overrides: Sequence[str] = (), storage: str = "", progress: bool = False,
        fit: preflight_lib.Target | None = None):
  """Works on the sweep until it has `spec["trials"]` finished trials; returns the study.

  `fit` (`jaxllm sweep --preflight TOPOLOGY`): each trial's steps are first compiled for that
  slice (jaxllm/tools/preflight.py); one that does not fit is pruned without training.
  """
  import optuna

  config_path, sweep_dir = pathlib.Path(config_path), pathlib.Path(sweep_dir)
  study = make_study(spec, f"jaxllm-{config_path.stem}", sweep_dir, storage)
  (sweep_dir / "sweep.json").write_text(json.dumps(spec, indent=2) + "\n")

  def after_trial(study, trial):
    sweep_results.write_results(study, spec, sweep_dir)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                    optuna.trial.TrialState.PRUNED))
    if len(done) >= spec["trials"]:
      study.stop()

  if spec.get("vectorize", 1) > 1:
    if fit is not None:
      raise JaxllmError("--preflight checks trials one by one: leave out --vectorize (vectorised "
                        "trials share one model, which preflight can check alone)")
    _run_vectorized(study, config_path, overrides, spec, sweep_dir)
  elif len(sweep_results.finished(study)) < spec["trials"]:
    study.optimize(_objective(config_path, overrides, spec, sweep_dir, progress, fit),
                   callbacks=[after_trial], catch=(_Surplus,))
  sweep_results.write_results(study, spec, sweep_dir)
  return study


def _run_vectorized(study, config_path: pathlib.Path, overrides: Sequence[str], spec: dict,
                    sweep_dir: pathlib.Path) -> None:
  """Groups of `spec["vectorize"]` trials, each group trained at once (jaxllm/tools/vectorized.py).

  One worker: a group cut short by a kill is failed and asked again on the next run.
  """
  import optuna

  for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    if trial.user_attrs.get("vectorised"):
      study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
  if spec["sampler"] == "grid":
    done = [t.params for t in sweep_results.counted(study)]
    keys = list(spec["params"])
    for values in itertools.product(*(spec["params"][k] for k in keys)):
      if dict(zip(keys, values)) not in done:
        study.enqueue_trial(dict(zip(keys, values)))
  while (missing := spec["trials"] - len(sweep_results.finished(study))) > 0:
    group = [study.ask() for _ in range(min(spec["vectorize"], missing))]
    trials = [{key: _suggest(trial, key, v) for key, v in spec["params"].items()}
              for trial in group]
    workdirs = [sweep_dir / f"trial_{trial.number:03d}" for trial in group]
    for trial, workdir, values in zip(group, workdirs, trials):
      trial.set_user_attr("vectorised", True)
      trial.set_user_attr("workdir", str(workdir))
      print(f"trial {trial.number}: {values} -> {workdir}")
    config = config_lib.load_config(config_path)
    config_lib.apply_overrides(config, overrides)
    figures = vectorized.run(config, trials, workdirs)
    for trial, result in zip(group, figures):
      value = result.get(spec["metric"])
      trial.set_user_attr("seconds", result["wall_seconds"] / len(group))
      if value is None or not math.isfinite(value):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
      else:
        study.tell(trial, float(value))
    sweep_results.write_results(study, spec, sweep_dir)
