"""`jaxllm arena`: ratings on synthetic battle logs of known strengths (numpy), the judge's
swap rule and the length control, a resumed battle log, votes, and an arena of tiny jaxllm
runs judged by a fake OpenAI-compatible judge on 127.0.0.1, through the command line."""

import csv
import hashlib
import json
import re
import string

import fastapi
import jax
import numpy as np
import pytest

from jaxllm import cli
from jaxllm.config import default_config
from jaxllm.data.tokenizer import CharTokenizer
from jaxllm.errors import JaxllmError
from jaxllm.eval import arena, leaderboard, ratings
from jaxllm.models.gpt import init_params
from jaxllm.serve import server as server_lib
from jaxllm.training import rundir

TRUTH = np.linspace(800.0, 1200.0, 8)  # 8 models over 400 points
ANCHOR = 3
TRUTH = TRUTH - TRUTH[ANCHOR] + 1000  # the anchor's rating is 1000
PROMPTS = [{"instruction": "Name a colour."}, {"instruction": "Add two and three."},
           {"instruction": "Rewrite the sentence.", "input": "The cat sat."},
           {"instruction": "Give a synonym for fast."}, {"instruction": "What is a verb?"}]

ANSWER = re.compile(r"\[The Start of Assistant .'s Answer\]\n(.*?)\n\[The End", re.S)


def synthetic(seed: int, battles: int, truth=TRUTH):
  """Battles of random pairs, 10% ties; the others won so that model a's expected score is
  sigma(ln10 (r_a - r_b) / 400), the Bradley-Terry model with a tie half a win."""
  rng = np.random.default_rng(seed)
  a = rng.integers(0, len(truth), battles)
  b = (a + rng.integers(1, len(truth), battles)) % len(truth)
  expected = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
  win = rng.random(battles) < (expected - 0.05) / 0.9
  return a, b, np.where(rng.random(battles) < 0.1, 0.5, win.astype(np.float64))


def test_the_fit_is_lmsys_logistic_regression_and_exact_on_expected_counts():
  a, b, score = synthetic(0, 5000)
  fitted = ratings.bradley_terry(a, b, score, 8, ANCHOR)
  # Chatbot Arena's compute_mle_elo: rows +-ln10, wins weighted 2, ties 1 in each direction.
  sklearn = pytest.importorskip("sklearn.linear_model")
  wins = ratings.pair_counts(a, b, score, 8)[0]
  x, y, weight = [], [], []
  for i in range(8):
    for j in range(8):
      if i != j:
        row = np.zeros(8)
        row[i], row[j] = np.log(10), -np.log(10)
        x += [row, row]
        y += [1, 0]
        weight += [2 * wins[i, j], 2 * wins[j, i]]
  model = sklearn.LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-10, max_iter=10000)
  model.fit(np.array(x), np.array(y), sample_weight=np.array(weight))
  lmsys = 400 * model.coef_[0] + 1000
  np.testing.assert_allclose(fitted, lmsys - lmsys[ANCHOR] + 1000, atol=1e-3)
  # With the expected counts of the model itself the fit gives the truth back.
  expected = 1 / (1 + 10 ** ((TRUTH[None, :] - TRUTH[:, None]) / 400))
  exact = ratings.fit_bradley_terry((1000 * expected * (1 - np.eye(8)))[None], ANCHOR)[0]
  np.testing.assert_allclose(exact, TRUTH, atol=1e-6)


def test_ratings_of_known_strengths_are_within_20_points_in_order():
  # 50,000 battles a seed: at 5,000 the sampling error alone (about 11 points a model against
  # the anchor) puts some model more than 20 points off in 8 of 20 seeds (docs/evaluation.md).
  for seed in range(5):
    fitted = ratings.bradley_terry(*synthetic(seed, 50_000), 8, ANCHOR)
    assert np.abs(fitted - TRUTH).max() < 20, (seed, fitted - TRUTH)
    assert list(np.argsort(fitted)) == list(range(8))
    assert fitted[ANCHOR] == pytest.approx(1000)


def test_bootstrap_intervals_hold_the_truth_and_give_ranks():
  held = []
  for seed in range(20):
    a, b, score = synthetic(100 + seed, 5000)
    lower, upper = ratings.intervals(ratings.bootstrap(a, b, score, 8, ANCHOR, 100, seed))
    held.append((lower <= TRUTH) & (TRUTH <= upper))
    assert lower[ANCHOR] == upper[ANCHOR] == pytest.approx(1000)  # every resample anchored
  held = np.array(held)
  others = np.delete(held, ANCHOR, axis=1)  # the anchor's interval is the point 1000
  assert others.mean() >= 0.85, others.mean()
  assert list(ratings.ranks(np.array([10., 5, 0, -10]), np.array([20., 15, 9, 0]))) == [1, 1, 2, 3]


def test_online_elo_and_win_rates():
  a, b, score = np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([1.0, 0.5, 0.0])
  elo = ratings.online_elo(a, b, score, 3, anchor=None)
  assert elo[0] == pytest.approx(1002 + 4 * (0.5 - 1 / (1 + 10 ** (-2 / 400))))
  assert elo.sum() == pytest.approx(3000)  # what one gains the other loses
  rate, games = ratings.win_rates(a, b, score, 3)
  assert rate[0, 1] == 1 and rate[0, 2] == 0.5 and rate[2, 1] == 1 and np.isnan(rate[1, 1])
  assert games.tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
  a, b, score = synthetic(7, 20_000)
  online = ratings.online_elo(a, b, score, 8, anchor=ANCHOR)
  assert list(np.argsort(online)) == list(range(8))


class FakeJudge:
  """An OpenAI-compatible judge on 127.0.0.1: `rule(answer_a, answer_b) -> reply`."""

  def __init__(self, rule):
    self.calls = []
    app = fastapi.FastAPI()

    @app.get("/v1/models")
    async def models():
      return {"object": "list", "data": [{"id": "rule", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
      text = body["messages"][-1]["content"]
      answers = ANSWER.findall(text)
      self.calls.append(answers)
      return {"choices": [{"index": 0, "message": {"role": "assistant",
                                                   "content": rule(*answers)}}]}

    self.server = server_lib.Background(app)
    self.url = self.server.url + "/v1"


@pytest.fixture
def first_answer_judge():
  judge = FakeJudge(lambda a, b: "Assistant A is better. [[A]]")
  yield judge
  judge.server.stop()


def _fixed(texts):
  return lambda records: [texts[i % len(texts)] + " " + r["instruction"] for i, r in
                          enumerate(records)]


def test_an_always_first_judge_gives_ties_after_the_swap(tmp_path, first_answer_judge):
  models = {"x": _fixed(["red"]), "y": _fixed(["a longer answer"]), "z": _fixed(["five"])}
  records = [{**r, "id": str(i)} for i, r in enumerate(PROMPTS)]
  board = arena.arena(models, records, tmp_path, judge=arena.url_judge(first_answer_judge.url,
                                                                       "rule"), rounds=20)
  battles = arena.read_jsonl(tmp_path / arena.BATTLES)
  assert len(battles) == 15 and {b["winner"] for b in battles} == {"tie"}
  assert all(b["verdicts"] == ["A", "A"] for b in battles)
  calls = first_answer_judge.calls
  assert len(calls) == 30 and all(calls[i] == calls[i + 1][::-1] for i in range(0, 30, 2))
  assert board["ties"] == 15 and all(r["rating"] == pytest.approx(1000) for r in board["rows"])


def _length_judge(messages):
  """Prefers the longer of two answers of equal quality with probability
  sigma(3 tanh(|difference| / 150)), drawn from the pair itself (the same in both orders)."""
  a, b = ANSWER.findall(messages[-1]["content"])
  pair = "\0".join(sorted((a, b))).encode()
  u = int(hashlib.sha256(pair).hexdigest()[:12], 16) / 16 ** 12
  longer_wins = u < 1 / (1 + np.exp(-3 * np.tanh(abs(len(a) - len(b)) / 150)))
  return "[[A]]" if (len(a) > len(b)) == longer_wins else "[[B]]"


def test_a_judge_preferring_length_wins_raw_but_not_length_controlled(tmp_path):
  rng = np.random.default_rng(0)
  count = 3000
  base = rng.integers(100, 300, count)
  extra = np.maximum(rng.normal(120, 150, count), -90).astype(int)  # mostly longer

  def words(lengths, tag):
    return lambda records: [f"{tag}{r['id']} " + "x" * int(lengths[int(r["id"])])
                            for r in records]

  records = [{"instruction": f"Task {i}.", "id": str(i)} for i in range(count)]
  board = arena.arena({"base": words(base, "b"), "long": words(base + extra, "l")}, records,
                      tmp_path, judge=_length_judge, rounds=50, progress=False)
  long_row = next(r for r in board["rows"] if r["model"] == "long")
  assert board["battles"] == count and board["baseline"] == "base"
  assert long_row["win_rate"] >= 65, long_row
  assert abs(long_row["lc_win_rate"] - 50) <= 3, long_row


def test_a_killed_arena_resumes_without_asking_again(tmp_path):
  asked, answered, killed = [], [], []

  def judge(messages):
    asked.append(messages)
    if len(asked) == 7 and not killed:
      killed.append(True)
      raise KeyboardInterrupt  # killed in the fourth battle's first verdict
    return "[[A]]" if "red" in messages[-1]["content"].split("Assistant B")[0] else "[[B]]"

  def red(records):
    answered.append(len(records))
    return ["red " + r["instruction"] for r in records]

  models = {"x": red, "y": _fixed(["blue"]), "z": _fixed(["green"])}
  records = [{**r, "id": str(i)} for i, r in enumerate(PROMPTS)]
  with pytest.raises(KeyboardInterrupt):
    arena.arena(models, records, tmp_path, judge=judge, rounds=20, progress=False)
  assert len(arena.read_jsonl(tmp_path / arena.BATTLES)) == 3
  with open(tmp_path / arena.BATTLES, "a") as f:
    f.write('{"prompt_id": "4", "model_a": "x", "mod')  # a line torn by a kill
  asked.clear()
  board = arena.arena(models, records, tmp_path, judge=judge, rounds=20, progress=False)
  assert len(asked) == 2 * (15 - 3) and answered == [5]  # the answers came from the cache
  battles = arena.read_jsonl(tmp_path / arena.BATTLES)
  assert len(battles) == 15 and len({arena.battle_key(b["prompt_id"], b["model_a"],
                                                      b["model_b"]) for b in battles}) == 15
  assert board["rows"][0]["model"] == "x" and board["rows"][0]["wins"] == 10
  asked.clear()
  arena.arena(models, records, tmp_path, judge=judge, rounds=20, progress=False)
  assert asked == []
  with pytest.raises(JaxllmError, match="answer to another prompt 0"):
    arena.arena(models, [{**records[0], "instruction": "Other."}], tmp_path, judge=judge)


def test_votes_and_one_line_errors(tmp_path, capsys):
  votes = tmp_path / "votes.jsonl"
  lines = [{"prompt_id": str(i % 5), "model_a": "p", "model_b": "q",
            "winner": ["a", "a", "tie", "b"][i % 4]} for i in range(40)]
  votes.write_text("".join(json.dumps(v) + "\n" for v in lines))
  prompts = tmp_path / "prompts.json"
  prompts.write_text(json.dumps(PROMPTS))
  out = tmp_path / "out"
  assert cli.main(["arena", "--votes", str(votes), "--out", str(out), "--anchor", "q",
                   "--rounds", "50", "--no-progress"]) == 0
  rows = list(csv.DictReader(open(out / "leaderboard.csv")))
  assert [r["model"] for r in rows] == ["p", "q"] and rows[0]["wins"] == "20"
  assert rows[0]["ties"] == "10" and rows[0]["losses"] == "10"
  assert float(rows[1]["rating"]) == 1000
  # p's score 25 / 40: 400 log10(25 / 15) above q
  assert float(rows[0]["rating"]) == pytest.approx(1000 + 400 * np.log10(25 / 15), abs=1e-3)
  assert "q | 1000.0 |" in capsys.readouterr().out
  for argv, message in (
      (["--out", str(out)], "give --judge-url URL --judge-model M"),
      (["--out", str(out), "--votes", str(votes), "--judge-url", "http://x"], "give one"),
      (["--out", str(out), "--judge-url", "http://x", "--judge-model", "m", "--models", "a=b"],
       "at least two models"),
      (["--out", str(out), "--votes", str(votes), "--anchor", "nope"], "not one of the models"),
      (["--out", str(out), "--judge-url", "http://x", "--judge-model", "m", "--models",
        "a=/nowhere,b=/nowhere", "--prompts", str(prompts)], "neither a run directory")):
    assert cli.main(["arena", *argv]) == 2
    assert message in capsys.readouterr().err
  with pytest.raises(JaxllmError, match="unreachable"):
    arena.chat("http://127.0.0.1:9", "m", [], max_tokens=1, timeout=5)


TOKENIZER = CharTokenizer(string.ascii_letters + string.digits + " .,:;!?#'-\n")


def _tiny_run(path, seed):
  config = default_config()
  for key, value in dict(n_layer=2, n_head=2, d_model=32, context_length=256).items():
    config.model[key] = value
  model = rundir.build_model(rundir.resolve_model(config.model, TOKENIZER))
  params = jax.jit(init_params, static_argnums=0)(model, jax.random.key(seed))
  # At init scale a GPT's argmax repeats the last token; x10 makes it depend on the context.
  params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, params)
  return rundir.write_run(path, config, params, TOKENIZER.to_json())


def test_an_arena_of_jaxllm_runs_end_to_end(tmp_path, capsys):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
  # A rule-based judge: the answer with more distinct characters (a tie if as many).
  judge = FakeJudge(lambda a, b: "[[A]]" if len(set(a)) > len(set(b)) else
                    "[[B]]" if len(set(b)) > len(set(a)) else "[[C]]")
  endpoint = FakeJudge(lambda *_: "")  # no answers in it: a model that says nothing
  try:
    models = (f"one={_tiny_run(tmp_path / 'one', 0)},two={_tiny_run(tmp_path / 'two', 1)},"
              f"mute={endpoint.url}")
    argv = ["arena", "--models", models, "--prompts", str(prompts), "--out",
            str(tmp_path / "arena"), "--judge-url", judge.url, "--judge-model", "rule",
            "--max-tokens", "12", "--rounds", "50", "--no-progress"]
    assert cli.main(argv) == 0
    assert len(judge.calls) == 30 and len(endpoint.calls) == 5
    assert cli.main(argv) == 0  # all cached: nothing asked again
    assert len(judge.calls) == 30 and len(endpoint.calls) == 5
  finally:
    judge.server.stop()
    endpoint.server.stop()
  out = tmp_path / "arena"
  for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "ratings.png",
               "winrates.png", "answers.jsonl", "battles.jsonl"):
    assert (out / name).is_file(), name
  rows = list(csv.DictReader(open(out / "leaderboard.csv")))
  assert sorted(r["model"] for r in rows) == ["mute", "one", "two"]
  assert all(r["battles"] == "10" for r in rows)
  assert rows[-1]["model"] == "mute" and rows[-1]["wins"] == "0"  # "" beats nothing
  answers = arena.read_jsonl(out / "answers.jsonl")
  assert len(answers) == 15 and all(a["answer"] for a in answers if a["model"] != "mute")
  board = json.loads((out / "leaderboard.json").read_text())
  assert board["battles"] == 15 and board["anchor"] == "one"
  assert "| rank | model | rating |" in (out / "leaderboard.md").read_text()
  assert leaderboard.markdown(board) == (out / "leaderboard.md").read_text()
