"""The `jaxllm` command.

    jaxllm train --config experiments/shakespeare_char.py [--workdir DIR] [--config.KEY=VALUE ...]
    jaxllm generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T] ...

Problems a user can fix (a missing file, an unknown config key, ...) print one line,
`jaxllm: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys


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

  train = commands.add_parser(
      "train", help="pretrain a model",
      description="Train as an experiment file says; override any key with --config.KEY=VALUE.")
  train.add_argument("--config", required=True, help="experiments/<name>.py")
  train.add_argument("--workdir", help="run directory (default: runs/<experiment name>)")
  train.add_argument("--no-progress", action="store_true", help="no progress bar")

  generate = commands.add_parser("generate", help="sample text from a trained run")
  generate.add_argument("--workdir", required=True, help="the run directory of `jaxllm train`")
  generate.add_argument("--prompt", default="\n")
  generate.add_argument("--max-new-tokens", type=int, default=200)
  generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  generate.add_argument("--top-k", type=int, default=0, help="0 = off")
  generate.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  generate.add_argument("--seed", type=int, default=0)
  generate.add_argument("--num-samples", type=int, default=1)
  return parser


def _train(args, overrides: list[str]) -> None:
  from jaxllm import config as config_lib
  from jaxllm import loop

  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, overrides)
  workdir = args.workdir or pathlib.Path("runs") / pathlib.Path(args.config).stem
  loop.run(config, workdir, progress=not args.no_progress)


def _generate(args) -> None:
  from jaxllm import generate as generate_lib
  from jaxllm import run_io
  from jaxllm.errors import JaxllmError

  _, model, params, tokenizer = run_io.load_run(args.workdir)
  prompt = args.prompt.encode("latin-1", "backslashreplace").decode("unicode_escape")
  if not prompt:
    raise JaxllmError("--prompt is empty (give at least one character)")
  room = model.config.context_length - len(tokenizer.encode(prompt))
  if args.max_new_tokens > room:
    raise JaxllmError(f"prompt ({len(tokenizer.encode(prompt))} tokens) + --max-new-tokens "
                      f"{args.max_new_tokens} exceeds the context length "
                      f"{model.config.context_length} (ask for at most {max(room, 0)} tokens)")
  texts = generate_lib.generate_text(
      model, params, tokenizer, [prompt] * args.num_samples, max_new_tokens=args.max_new_tokens,
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  for i, text in enumerate(texts):
    if args.num_samples > 1:
      print(f"--- sample {i + 1} ---")
    print(prompt + text)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = _split_config_overrides(argv)
  parser = _parser()
  args = parser.parse_args(rest)
  if overrides and args.command != "train":
    parser.error(f"--config.{overrides[0]} only applies to `jaxllm train`")

  from jaxllm.errors import JaxllmError

  try:
    if args.command == "train":
      _train(args, overrides)
    else:
      _generate(args)
  except JaxllmError as e:
    print(f"jaxllm: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxllm: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
