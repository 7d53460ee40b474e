"""The `jaxllm` command.

    jaxllm train --config experiments/shakespeare_char.py [--workdir DIR] [--config.KEY=VALUE ...]
    jaxllm generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T] ...
    jaxllm finetune --config experiments/spam_classifier.py [--workdir DIR] [--config.KEY=VALUE ...]
      (the same trainer as `train`: train.task says what it trains)
    jaxllm eval --workdir DIR [--text FILE] [--config.KEY=VALUE ...]
    jaxllm eval --workdir DIR --tasks T1,T2 [--include-path DIR] [--num-fewshot K] [--limit N]
      (lm-evaluation-harness tasks, in-process: jaxllm/eval/harness.py)
    jaxllm convert --from gpt2-medium|FOLDER --out DIR [--to jaxllm|hf]
    jaxllm reproduce experiments/<name>.py [--workdir DIR] [--rerun] [--seeds S1,S2,...]
      [--config.KEY=VALUE ...]
    jaxllm sweep --config experiments/<name>.py [--param KEY=V1,V2 ...] [--trials N] ...
    jaxllm launch local|tpu|xpk|slurm [options] -- train --config experiments/<name>.py ...
    jaxllm serve --workdir DIR [--host H] [--port P] [--slots S] [--max-queue Q] [--model-name N]
      (an OpenAI-compatible API: /v1/completions, /v1/chat/completions, /health, /metrics)
    jaxllm preflight --config experiments/<name>.py --topology v5litepod-8 [--slices N]
      [--find batch|remat] [--json FILE] [--config.KEY=VALUE ...]
      (does the run fit? its steps compiled for a TPU slice: memory per chip, FLOPs)
    jaxllm bench-serve --url URL --requests N [--rate R] [--concurrency C] [--json FILE] ...
      (TTFT, TPOT, ITL, throughput of any OpenAI-compatible server: jaxllm/serve/bench.py)
    jaxllm arena --models A=RUN,B=URL --prompts FILE --out DIR --judge-url URL --judge-model M
      (pairwise battles, Bradley-Terry ratings, a leaderboard: jaxllm/eval/arena.py)

Problems a user can fix (a missing file, an unknown config key, ...) print one line,
`jaxllm: error: ...`, and exit with status 2. A training run stopped by SIGTERM saves a
checkpoint at the next step boundary, prints `jaxllm: preempted ...` and exits with status 75
(EX_TEMPFAIL); the same command resumes it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from jaxllm.cli import arena, preflight, sweep
from jaxllm.errors import PREEMPTED_EXIT_STATUS, JaxllmError
from jaxllm.serve import bench

# The subcommands that take --config.KEY=VALUE overrides.
OVERRIDE_COMMANDS = ("train", "finetune", "eval", "reproduce", "sweep", "serve", "preflight")


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key = arg[len("--config."):]
      if "=" not in key:
        if i + 1 >= len(argv):
          rest.append(arg)  # let argparse report it
          break
        key = f"{key}={argv[i + 1]}"
        i += 1
      overrides.append(key)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxllm", description="GPT-style language models in JAX.")
  commands = parser.add_subparsers(dest="command", required=True)
  _add_train(commands)
  _add_generate(commands)
  _add_finetune(commands)
  _add_eval(commands)
  _add_convert(commands)
  _add_reproduce(commands)
  sweep.add_parser(commands)
  _add_launch(commands)
  _add_serve(commands)
  preflight.add_parser(commands)
  bench.add_parser(commands)
  arena.add_parser(commands)
  return parser


def _add_train(commands) -> None:
  train = commands.add_parser(
      "train", help="pretrain a model",
      description="Train as an experiment file says; override any key with --config.KEY=VALUE.")
  train.add_argument("--config", required=True, help="experiments/<name>.py")
  train.add_argument("--workdir", help="run directory (default: runs/<experiment name>)")
  train.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_generate(commands) -> None:
  generate = commands.add_parser("generate", help="sample text from a trained run")
  generate.add_argument("--workdir", required=True, help="the run directory of `jaxllm train`")
  generate.add_argument("--prompt", default="\n")
  generate.add_argument("--max-new-tokens", type=int, default=200)
  generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  generate.add_argument("--top-k", type=int, default=0, help="0 = off")
  generate.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  generate.add_argument("--seed", type=int, default=0)
  generate.add_argument("--num-samples", type=int, default=1)


def _add_finetune(commands) -> None:
  finetune = commands.add_parser(
      "finetune", help="finetune a model: classification, instructions, preferences (DPO)",
      description="The trainer of `jaxllm train`, for experiments whose train.task is classify, "
                  "instruct or dpo (train.init_from, train.trainable, ...); override any key "
                  "with --config.KEY=VALUE. Writes DIR/eval.json.")
  finetune.add_argument("--config", required=True, help="experiments/<name>.py")
  finetune.add_argument("--workdir", help="run directory (default: runs/<experiment name>)")
  finetune.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_eval(commands) -> None:
  evaluate = commands.add_parser(
      "eval", help="evaluate a run",
      description="A finetuned run: its task's figures on its splits, into DIR/eval.json "
                  "(--config.KEY=VALUE overrides its config, e.g. --config.judge.url=...). "
                  "Any run with --text: the perplexity of that text. Any decoder run with "
                  "--tasks: lm-evaluation-harness tasks (pip install -e .[eval]), its table "
                  "printed and its results in DIR/lm_eval/results.json.")
  evaluate.add_argument("--workdir", required=True, help="a run directory")
  evaluate.add_argument("--text", help="a UTF-8 text file: report its perplexity")
  evaluate.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated "
                                        "(hellaswag,arc_easy; or tasks of --include-path)")
  evaluate.add_argument("--include-path", help="with --tasks: a folder of task YAML files")
  evaluate.add_argument("--num-fewshot", type=int, help="with --tasks: examples in each prompt")
  evaluate.add_argument("--limit", type=float,
                        help="with --tasks: documents per task (below 1: a fraction)")
  evaluate.add_argument("--batch-size", type=int, default=8,
                        help="windows (--text) or rows (--tasks) per batch")
  evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_convert(commands) -> None:
  convert = commands.add_parser(
      "convert", help="import GPT-2 / Llama / Qwen2 / Mistral / BERT weights as a run "
                      "directory, or export one",
      description="--to jaxllm (default): a GPT-2 checkpoint folder (Hugging Face "
                  "model.safetensors + config.json, or OpenAI's model.ckpt.* + hparams.json), a "
                  "Hugging Face Llama, Qwen2 or Mistral folder (config.json, model.safetensors "
                  "or sharded with an index, tokenizer.json), or a name (gpt2, gpt2-medium, "
                  "gpt2-large, gpt2-xl: downloaded once), or a Hugging Face BERT folder "
                  "(BertModel, BertForMaskedLM, BertForSequenceClassification, with "
                  "tokenizer.json or vocab.txt), into a run directory that generate, eval and "
                  "train.init_from read. --to hf: a run directory into a Hugging Face folder "
                  "(GPT-2, Llama / Qwen2 for a run with Llama's components, BERT for an "
                  "encoder run).")
  convert.add_argument("--from", dest="source", required=True, help="folder or GPT-2 name")
  convert.add_argument("--out", required=True, help="the folder to write")
  convert.add_argument("--to", choices=("jaxllm", "hf"), default="jaxllm")
  convert.add_argument("--cache-dir", help="where names are downloaded (default ~/.cache/jaxllm)")


def _seeds(text: str) -> list[int]:
  try:
    return [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise JaxllmError(f"--seeds takes integers separated by commas; got '{text}'") from None


def _add_reproduce(commands) -> None:
  reproduce = commands.add_parser(
      "reproduce", help="check a run against the figures its experiment expects",
      description="Trains the experiment (or reads its finished run in --workdir) and prints "
                  "its EXPECTED figures against the obtained ones, pass or fail, into "
                  "DIR/reproduce.md. Exits 1 if any fails.")
  reproduce.add_argument("experiment", nargs="?", help="experiments/<name>.py")
  reproduce.add_argument("--all", action="store_true",
                         help="every experiment of experiments/ with EXPECTED figures")
  reproduce.add_argument("--cpu", action="store_true", help="with --all: the CPU-sized ones")
  reproduce.add_argument("--data-dir", default=os.environ.get("JAXLLM_SHARED_DATA"),
                         help="with --all: the folder of the experiments' DATA files "
                              "(default $JAXLLM_SHARED_DATA)")
  reproduce.add_argument("--experiments", default="experiments", help="with --all: the folder")
  reproduce.add_argument("--workdir", help="run directory (default: runs/<experiment name>)")
  reproduce.add_argument("--rerun", action="store_true", help="train even if a run is there")
  reproduce.add_argument("--seeds", help="S1,S2,...: one run per train.seed (DIR/seed-S); "
                         "EXPECTED against their mean, the spread of every figure")
  reproduce.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_launch(commands) -> None:
  # Listed here for --help; `main` hands `jaxllm launch ...` to jaxllm/tools/launch.py before parsing.
  commands.add_parser("launch", add_help=False,
                      help="run a jaxllm command on several processes or hosts: local, Cloud "
                           "TPU, xpk, SLURM (`jaxllm launch --help`)")


def _add_serve(commands) -> None:
  serve = commands.add_parser(
      "serve", help="serve a run over an OpenAI-compatible HTTP API",
      description="/v1/completions, /v1/chat/completions (the run's chat template: an instruct "
                  "run's prompt template, or a converted model's tokenizer_config.json), "
                  "/v1/models, /health and /metrics, over continuous batching in --slots rows "
                  "of one KV cache. --config.model.KEY=VALUE sets how the network runs (e.g. "
                  "model.matmul_dtype=bfloat16), --config.mesh.* the devices it runs on.")
  serve.add_argument("--workdir", required=True, help="a run directory (train or convert)")
  serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0: every interface")
  serve.add_argument("--port", type=int, default=8000, help="0: a free one")
  serve.add_argument("--slots", type=int, default=8, help="requests decoded at once")
  serve.add_argument("--max-queue", type=int, default=64,
                     help="requests waiting for a slot; more are answered 503")
  serve.add_argument("--model-name", help="the model's id in the API (default: the run "
                                          "directory's name)")
  serve.add_argument("--no-warm-up", action="store_true",
                     help="compile on the first requests, not before serving")


def _train(args, overrides: list[str]) -> None:
  import jaxllm

  config = jaxllm.load_config(args.config, overrides)
  workdir = args.workdir or pathlib.Path("runs") / pathlib.Path(args.config).stem
  jaxllm.train(config, workdir, progress=not args.no_progress)


def _eval(args, overrides: list[str]) -> None:
  import json

  import numpy as np

  from jaxllm.data import classification
  from jaxllm.errors import JaxllmError
  from jaxllm.eval import figures, report
  from jaxllm.training import rundir as run_io

  if args.tasks is not None:
    if args.text:
      raise JaxllmError("--text and --tasks are two evaluations; give one of them")
    from jaxllm.eval import harness  # lm_eval: loaded for --tasks alone

    return harness.main(args, overrides)
  for option in ("include_path", "num_fewshot", "limit"):
    if getattr(args, option) is not None:
      raise JaxllmError(f"--{option.replace('_', '-')} goes with --tasks (lm-evaluation-harness "
                        f"tasks); add --tasks or drop it")
  if args.text:
    other = [o for o in overrides if not o.startswith("model.")]
    if other:
      raise JaxllmError(f"--config.{other[0].split('=')[0]} has no effect on `jaxllm eval "
                        f"--text` (a perplexity reads only model.* keys); drop it")
    _, model, params, tokenizer = run_io.load_run(
        args.workdir, decoder_for="next-token perplexity", overrides=overrides)
    tokens = np.asarray(tokenizer.encode(classification.read_utf8(args.text)), np.int32)
    result = figures.perplexity(model, params, tokens, args.batch_size,
                                progress=not args.no_progress)
    print(f"{args.text}: {result['tokens']:,} tokens, loss {result['loss']:.4f}, "
          f"perplexity {result['perplexity']:.2f}")
    return
  config, model, params, tokenizer = run_io.load_finetuned(args.workdir, overrides)
  result = report.evaluate_finetuned(config, model, params, tokenizer, args.workdir,
                                     progress=not args.no_progress)
  print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


def _convert(args) -> None:
  import jaxllm

  hparams = jaxllm.convert(args.source, args.out, to=args.to, cache_dir=args.cache_dir)
  print(f"wrote {args.out}: {hparams['n_layer']} layers, {hparams['n_head']} heads, d_model "
        f"{hparams['d_model']}, context {hparams['context_length']}, vocab {hparams['vocab_size']}")


def _launch(argv: list[str]) -> int:
  from jaxllm.errors import JaxllmError
  from jaxllm.tools import launch

  try:
    return launch.main(argv)
  except JaxllmError as e:
    print(f"jaxllm: error: {e}", file=sys.stderr)
    return 2


def _serve(args, overrides: list[str]) -> None:
  from jaxllm.errors import JaxllmError
  from jaxllm.serve import server  # fastapi and uvicorn: loaded for `serve` alone

  other = [o for o in overrides if not o.startswith(("model.", "mesh."))]
  if other:
    raise JaxllmError(f"--config.{other[0].split('=')[0]} has no effect on `jaxllm serve` (it "
                      f"reads only model.* and mesh.* keys); drop it")
  server.serve(args.workdir, host=args.host, port=args.port, slots=args.slots,
               max_queue=args.max_queue, model_name=args.model_name, overrides=overrides,
               warm_up=not args.no_warm_up)


def _generate(args) -> None:
  from jaxllm.errors import JaxllmError
  from jaxllm.serve import generate as generate_lib
  from jaxllm.training import rundir as run_io

  _, model, params, tokenizer = run_io.load_run(args.workdir, decoder_for="generating text")
  prompt = args.prompt.encode("latin-1", "backslashreplace").decode("unicode_escape")
  if not prompt:
    raise JaxllmError("--prompt is empty (give at least one character)")
  texts = generate_lib.generate_text(
      model, params, tokenizer, [prompt] * args.num_samples, max_new_tokens=args.max_new_tokens,
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  for i, text in enumerate(texts):
    if args.num_samples > 1:
      print(f"--- sample {i + 1} ---")
    print(prompt + text)


def _reproduce(args, overrides: list[str]) -> int:
  """`jaxllm reproduce`: 0 if every expected figure holds, 1 if one fails."""
  from jaxllm.tools import reproduce

  if args.all == bool(args.experiment):
    raise JaxllmError("give one experiment file, or --all (not both)")
  progress = not args.no_progress
  if args.all:
    results = reproduce.reproduce_all(args.experiments, cpu_only=args.cpu,
                                      data_dir=args.data_dir, runs=args.workdir or "runs",
                                      rerun=args.rerun, progress=progress)
    return 0 if all(r.passed for rows in results.values() for r in rows) else 1
  if args.seeds:
    rows = reproduce.reproduce_seeds(args.experiment, _seeds(args.seeds), args.workdir,
                                     overrides, rerun=args.rerun, progress=progress)
  else:
    rows = reproduce.reproduce(args.experiment, args.workdir, overrides, rerun=args.rerun,
                               progress=progress)
  return 0 if all(row.passed for row in rows) else 1


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["launch"]:  # what follows -- is another jaxllm command, left as it is
    return _launch(argv[1:])
  rest, overrides = _split_config_overrides(argv)
  parser = _parser()
  args = parser.parse_args(rest)
  if overrides and args.command not in OVERRIDE_COMMANDS:
    parser.error(f"--config.{overrides[0]} only applies to `jaxllm "
                 f"{'`, `'.join(OVERRIDE_COMMANDS)}`")
  if args.command == "bench-serve":  # an HTTP client: no JAX to set up
    return bench.main(args)

  from jaxllm import compile_cache, malloc
  from jaxllm.errors import JaxllmError, Preempted

  malloc.tune()  # before the first step's buffers: see jaxllm/malloc.py
  compile_cache.enable()  # before the first compilation: see jaxllm/compile_cache.py
  try:
    if args.command in ("train", "finetune"):
      _train(args, overrides)
    elif args.command == "eval":
      _eval(args, overrides)
    elif args.command == "convert":
      _convert(args)
    elif args.command == "sweep":
      sweep.main(args, overrides)
    elif args.command == "serve":
      _serve(args, overrides)
    elif args.command == "preflight":
      return preflight.main(args, overrides)
    elif args.command == "arena":
      return arena.main(args)
    elif args.command == "reproduce":
      return _reproduce(args, overrides)
    else:
      _generate(args)
  except JaxllmError as e:
    print(f"jaxllm: error: {e}", file=sys.stderr)
    return 2
  except Preempted as e:  # saved; the status asks a scheduler to run the command again
    print(f"jaxllm: {e}", file=sys.stderr)
    return PREEMPTED_EXIT_STATUS
  except KeyboardInterrupt:
    print("jaxllm: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
