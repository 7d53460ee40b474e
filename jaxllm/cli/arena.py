"""`jaxllm arena`'s command line (jaxllm/eval/arena.py runs it, eval/leaderboard.py rates)."""

from __future__ import annotations


def add_parser(commands) -> None:
  parser = commands.add_parser(
      "arena", help="pairwise battles between models, judged, rated as Chatbot Arena rates",
      description="Answers of each model (a jaxllm run, in-process; or an OpenAI-compatible "
                  "endpoint by URL) to each prompt, cached in OUT/answers.jsonl; battles judged "
                  "by an LLM judge in both orders (disagreeing verdicts are a tie) into the "
                  "resumable OUT/battles.jsonl, or people's votes; Bradley-Terry ratings with "
                  "bootstrap intervals, online Elo, win rates and length-controlled win rates "
                  "in OUT/leaderboard.md, .csv, .json, ratings.png and winrates.png.")
  parser.add_argument("--models", default="", help="NAME=RUN_DIR_OR_URL,... (a URL: "
                      "http://HOST:PORT/v1 of an OpenAI-compatible server)")
  parser.add_argument("--prompts", help="Alpaca records (instruction, input; optional id), "
                      ".json or .jsonl")
  parser.add_argument("--limit", type=int, default=0, help="the first N prompts (0: all)")
  parser.add_argument("--out", required=True, help="the arena's folder (answers, battles, "
                      "leaderboard); run the same command again to resume")
  parser.add_argument("--judge-url", help="an OpenAI-compatible server (http://HOST:PORT/v1)")
  parser.add_argument("--judge-model", help="the judge's model id on that server")
  parser.add_argument("--judge-max-tokens", type=int, default=512)
  parser.add_argument("--votes", help="JSONL of people's votes instead of a judge: "
                      "prompt_id, model_a, model_b, winner a|b|tie")
  parser.add_argument("--battles", type=int, default=0,
                      help="how many battles (default 0: every pair of models on every prompt)")
  parser.add_argument("--anchor", help="the model rated 1000 (default: the first)")
  parser.add_argument("--baseline", help="win rates against this model (default: the anchor)")
  parser.add_argument("--max-tokens", type=int, default=256, help="tokens of each answer")
  parser.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds")
  parser.add_argument("--seed", type=int, default=0,
                      help="battle order and sides, bootstrap, endpoints' sampling seed")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
  from jaxllm.errors import JaxllmError
  from jaxllm.eval import arena

  if args.votes and (args.judge_url or args.judge_model):
    raise JaxllmError("--votes and --judge-url are two sources of verdicts; give one")
  if not args.votes and not (args.judge_url and args.judge_model):
    raise JaxllmError("give --judge-url URL --judge-model M (an LLM judge) or --votes FILE")
  models = arena.parse_models(args.models) if args.models or not args.votes else {}
  if models and not args.prompts:
    raise JaxllmError("--models answer --prompts FILE: give it")
  records = arena.read_prompts(args.prompts, args.limit) if args.prompts else []
  judge = None
  if not args.votes:
    judge = arena.url_judge(args.judge_url, args.judge_model, max_tokens=args.judge_max_tokens,
                            seed=args.seed)
  board = arena.arena(models, records, args.out, judge=judge, judge_name=args.judge_model or "",
                      votes=args.votes, battles=args.battles, max_tokens=args.max_tokens,
                      seed=args.seed, anchor=args.anchor, baseline=args.baseline,
                      rounds=args.rounds, progress=not args.no_progress)
  from jaxllm.eval import leaderboard

  print(leaderboard.markdown(board), end="")
  print(f"leaderboard, battles and plots in {args.out}")
  return 0
