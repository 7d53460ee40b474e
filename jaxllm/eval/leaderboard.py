"""The arena's leaderboard: eval/ratings.py's figures of a battle log, written as
OUT/leaderboard.md, leaderboard.csv, leaderboard.json, ratings.png (ratings with their 95%
intervals) and winrates.png (the win-rate matrix as a heatmap)."""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from jaxllm.errors import JaxllmError
from jaxllm.eval import ratings

COLUMNS = ("rank", "model", "rating", "lower", "upper", "online_elo", "battles", "wins", "ties",
           "losses", "win_rate", "lc_win_rate", "mean_answer_chars")


def _check(name: str | None, names: Sequence[str], what: str) -> str:
  name = name or names[0]
  if name not in names:
    raise JaxllmError(f"--{what} '{name}' is not one of the models ({', '.join(names)})")
  return name


def _against(battles: Sequence[dict], model: str, baseline: str) -> dict[str, float]:
  """Raw and length-controlled win rates of `model` against `baseline` (battles of the two
  with answer lengths)."""
  preference, length, base_length = [], [], []
  for battle in battles:
    if {battle["model_a"], battle["model_b"]} != {model, baseline} or "len_a" not in battle:
      continue
    if battle.get("winner") not in ratings.SCORES:
      continue
    score = ratings.SCORES[battle["winner"]]
    first = battle["model_a"] == model
    preference.append(score if first else 1 - score)
    length.append(battle["len_a"] if first else battle["len_b"])
    base_length.append(battle["len_b"] if first else battle["len_a"])
  return ratings.length_controlled(np.array(preference), np.array(length),
                                   np.array(base_length))


def compute(battles: Sequence[dict], names: Sequence[str], *, anchor: str | None = None,
            baseline: str | None = None, rounds: int = 1000, seed: int = 0) -> dict[str, Any]:
  """The leaderboard of the battles among `names` (others are left out): rows best first."""
  names = list(names)
  anchor, baseline = _check(anchor, names, "anchor"), _check(baseline or anchor, names,
                                                              "baseline")
  battles = [b for b in battles if b["model_a"] in names and b["model_b"] in names]
  a_N, b_N, score_N = ratings.battle_arrays(battles, names)
  if len(a_N) == 0:
    raise JaxllmError("no battle between these models has a verdict; nothing to rate")
  m, i = len(names), names.index(anchor)
  rating_M = ratings.bradley_terry(a_N, b_N, score_N, m, i)
  lower_M, upper_M = ratings.intervals(ratings.bootstrap(a_N, b_N, score_N, m, i, rounds, seed))
  rank_M = ratings.ranks(lower_M, upper_M)
  online_M = ratings.online_elo(a_N, b_N, score_N, m, anchor=i)
  rate_MxM, games_MxM = ratings.win_rates(a_N, b_N, score_N, m)
  rows = []
  for j, name in enumerate(names):
    mine_a, mine_b = a_N == j, b_N == j
    won = (score_N[mine_a] == 1).sum() + (score_N[mine_b] == 0).sum()
    tied = (score_N[mine_a | mine_b] == 0.5).sum()
    vs = _against(battles, name, baseline) if name != baseline else {}
    rows.append({"rank": int(rank_M[j]), "model": name, "rating": float(rating_M[j]),
                 "lower": float(lower_M[j]), "upper": float(upper_M[j]),
                 "online_elo": float(online_M[j]), "battles": int((mine_a | mine_b).sum()),
                 "wins": int(won), "ties": int(tied),
                 "losses": int((mine_a | mine_b).sum() - won - tied),
                 "win_rate": _finite(vs.get("win_rate")),
                 "lc_win_rate": _finite(vs.get("lc_win_rate"))})
  order = np.argsort(-rating_M, kind="stable")
  return {"rows": [rows[j] for j in order], "models": [names[j] for j in order],
          "win_rates": [[_finite(x) for x in row] for row in rate_MxM[np.ix_(order, order)]],
          "games": games_MxM[np.ix_(order, order)].tolist(), "battles": int(len(a_N)),
          "ties": int((score_N == 0.5).sum()),
          "errors": sum(b.get("winner") == "error" for b in battles),
          "judges": sorted({str(b.get("judge", "")) for b in battles}), "anchor": anchor,
          "baseline": baseline, "rounds": rounds, "seed": seed, "online_k": ratings.ONLINE_K}


def _finite(value) -> float | None:
  """A figure for JSON: None for NaN (no battles to compute it from)."""
  return None if value is None or not np.isfinite(value) else float(value)


def _number(value, digits: int = 1) -> str:
  return "" if _finite(value) is None else f"{value:.{digits}f}"


def markdown(board: dict[str, Any]) -> str:
  base, lengths = board["baseline"], board.get("answer_length", {})
  lines = [f"{board['battles']} battles ({board['ties']} ties; {board['errors']} without a "
           f"verdict left out), judge: {', '.join(board['judges'])}. Bradley-Terry ratings on "
           f"the Elo scale, `{board['anchor']}` at 1000; 95% intervals of {board['rounds']} "
           f"bootstrap rounds (seed {board['seed']}); online Elo K={board['online_k']:g} in the "
           f"log's order; win rates against `{base}` (ties half; LC: length-controlled).", "",
           f"| rank | model | rating | 95% CI | online Elo | battles | W / T / L | win rate vs "
           f"{base} | LC win rate vs {base} | mean answer (chars) |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in board["rows"]:
    interval = f"+{r['upper'] - r['rating']:.1f} / -{r['rating'] - r['lower']:.1f}"
    lines.append(
        f"| {r['rank']} | {r['model']} | {r['rating']:.1f} | {interval} | "
        f"{r['online_elo']:.1f} | {r['battles']} | {r['wins']} / {r['ties']} / {r['losses']} | "
        f"{_number(r['win_rate'])} | {_number(r['lc_win_rate'])} | "
        f"{_number(lengths.get(r['model']), 0)} |")
  models = board["models"]
  lines += ["", "Win rate of the row's model against the column's (%, ties half; battles):", "",
            "| | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
  for name, rates, games in zip(models, board["win_rates"], board["games"]):
    cells = [f"{100 * x:.1f} ({g})" if x is not None else "" for x, g in zip(rates, games)]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_ratings(path: pathlib.Path, board: dict[str, Any]) -> None:
  from matplotlib.figure import Figure  # no pyplot: no display, no global state

  rows = board["rows"][::-1]  # the best at the top
  figure = Figure(figsize=(7, 1.2 + 0.45 * len(rows)), layout="constrained")
  axes = figure.subplots()
  rating = np.array([r["rating"] for r in rows])
  errors = np.array([[r["rating"] - r["lower"] for r in rows], [r["upper"] - r["rating"]
                                                                for r in rows]])
  axes.errorbar(rating, np.arange(len(rows)), xerr=errors, fmt="o", capsize=4)
  axes.set_yticks(np.arange(len(rows)), [f"{r['rank']}. {r['model']}" for r in rows])
  axes.set(xlabel=f"Bradley-Terry rating (Elo scale, {board['anchor']} = 1000), 95% interval",
           title=f"{board['battles']} battles")
  axes.grid(axis="x", alpha=0.3)
  figure.savefig(path, dpi=100)


def plot_win_rates(path: pathlib.Path, board: dict[str, Any]) -> None:
  from matplotlib.figure import Figure

  models, rates = board["models"], np.array(board["win_rates"], np.float64)
  figure = Figure(figsize=(1.6 + 0.9 * len(models), 1.2 + 0.8 * len(models)),
                  layout="constrained")
  axes = figure.subplots()
  image = axes.imshow(100 * rates, vmin=0, vmax=100, cmap="RdBu")
  for (i, j), value in np.ndenumerate(rates):
    if np.isfinite(value):
      axes.text(j, i, f"{100 * value:.0f}", ha="center", va="center")
  axes.set_xticks(range(len(models)), models, rotation=30, ha="right")
  axes.set_yticks(range(len(models)), models)
  axes.set(xlabel="against", ylabel="model", title="win rate (%), ties half")
  figure.colorbar(image, ax=axes)
  figure.savefig(path, dpi=100)


def write(out: str | pathlib.Path, board: dict[str, Any]) -> None:
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "leaderboard.md").write_text(markdown(board))
  (out / "leaderboard.json").write_text(json.dumps(board, indent=1) + "\n")
  with open(out / "leaderboard.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, COLUMNS)
    writer.writeheader()
    lengths = board.get("answer_length", {})
    for row in board["rows"]:
      writer.writerow({**row, "mean_answer_chars": lengths.get(row["model"])})
  plot_ratings(out / "ratings.png", board)
  plot_win_rates(out / "winrates.png", board)
