"""`jaxllm sweep`'s command line (jaxllm/tools/sweep.py runs the study)."""

from __future__ import annotations

import pathlib


def add_parser(commands) -> None:
  sweep = commands.add_parser(
      "sweep", help="a hyperparameter sweep on an Optuna study",
      description="Trials of an experiment over the parameters of its SWEEP dict and of "
                  "--param, on an Optuna study (SQLite in the sweep directory unless --storage "
                  "says otherwise). Run the same command again to finish a killed sweep, or "
                  "on several machines to share the trials.")
  sweep.add_argument("--config", required=True, help="experiments/<name>.py")
  sweep.add_argument("--sweep-dir", help="default: runs/<experiment name>-sweep")
  sweep.add_argument("--param", action="append", default=[], metavar="KEY=SPEC",
                     help="train.learning_rate=1e-3,3e-3 (values) or "
                          "train.learning_rate=loguniform:1e-4:1e-2 (uniform, int too)")
  sweep.add_argument("--trials", type=int, help="how many trials (default: the grid's size)")
  sweep.add_argument("--sampler", choices=("grid", "random", "tpe"))
  sweep.add_argument("--pruner", choices=("none", "median", "halving"))
  sweep.add_argument("--metric", help="an eval.json figure (default val_loss)")
  sweep.add_argument("--direction", choices=("minimize", "maximize"))
  sweep.add_argument("--seed", type=int, help="the sampler's seed")
  sweep.add_argument("--storage", default="", help="an Optuna storage URL, or journal:PATH")
  sweep.add_argument("--vectorize", type=int, metavar="K",
                     help="train K trials at once in one jitted step (trials that differ in "
                          "learning rate and its warmup, weight decay, betas, seed, init scale "
                          "only; the trial axis split over mesh.data devices)")
  sweep.add_argument("--grace-seconds", type=int,
                     help="a running trial silent this long is retried (default 30)")
  sweep.add_argument("--progress", action="store_true", help="progress bars for each trial")
  sweep.add_argument("--preflight", metavar="TOPOLOGY",
                     help="compile each trial for this TPU slice first (v5litepod-8, ...; see "
                          "`jaxllm preflight`) and prune the trials that do not fit")
  sweep.add_argument("--hbm-gib", type=float,
                     help="with --preflight: memory per device to fit in (default the chip's)")


def main(args, overrides: list[str]) -> None:
  from jaxllm import config as config_lib
  from jaxllm.errors import JaxllmError
  from jaxllm.tools import sweep, sweep_results

  module, _ = config_lib.load_experiment(args.config)
  spec = sweep.sweep_spec(module, args.param, trials=args.trials, sampler=args.sampler,
                          pruner=args.pruner, metric=args.metric, direction=args.direction,
                          seed=args.seed, grace_seconds=args.grace_seconds,
                          vectorize=args.vectorize)
  sweep_dir = pathlib.Path(args.sweep_dir or f"runs/{pathlib.Path(args.config).stem}-sweep")
  fit = None
  if args.preflight:
    from jaxllm.tools import preflight

    fit = preflight.target(args.preflight, memory_gib=args.hbm_gib)
  elif args.hbm_gib is not None:
    raise JaxllmError("--hbm-gib applies to --preflight TOPOLOGY: give both")
  print(f"sweep: {spec['trials']} trials of {', '.join(spec['params'])} ({spec['sampler']}"
        f" sampler, pruner {spec['pruner']}) in {sweep_dir}; TensorBoard: tensorboard "
        f"--logdir {sweep_dir}")
  study = sweep.run(args.config, spec, sweep_dir, overrides, args.storage,
                    progress=args.progress, fit=fit)
  print((sweep_dir / "results.md").read_text() if (sweep_dir / "results.md").is_file() else "")
  print(f"{len(sweep_results.results(study, spec))} trials; results in {sweep_dir}")
