"""Ratings from pairwise battles, as Chatbot Arena and AlpacaEval compute them (numpy only).

- `bradley_terry`: the maximum-likelihood Bradley–Terry fit of Chatbot Arena's notebook,
  P(a beats b) = sigma(ln 10 (r_a - r_b)), a tie counted as half a win and half a loss, on the
  Elo scale 400 r + 1000 with the anchor model at 1000. Fitted by Newton's method on the
  pairwise count matrix (the logistic regression's sufficient statistics), many resamples at
  once; a ridge of 1e-6 (in battles) keeps a model that won or lost every battle finite.
- `bootstrap`: the fit on resampled battle logs (battles drawn with replacement), its 2.5 and
  97.5 percentiles the 95% interval; `ranks`: 1 + the models whose lower bound is above this
  one's upper bound.
- `online_elo`: Elo updated battle by battle in the log's order (K=4, LMSYS's notebook).
- `win_rates`: the matrix of how often row beat column (ties half).
- `length_controlled`: AlpacaEval 2's length-controlled win rate in its minimal form: a
  logistic regression of the judge's preference for the model over the baseline on an
  intercept and tanh(length difference / its standard deviation); the LC win rate is the
  predicted win rate with the length difference set to 0, sigma(intercept).

Shapes are in the names: S resamples, M models, N battles.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxllm.errors import JaxllmError

SCALE, INITIAL = 400.0, 1000.0  # the Elo scale: 400 r + 1000
ONLINE_K = 4.0  # LMSYS's online Elo K
RIDGE = 1e-6
SCORES = {"model_a": 1.0, "tie": 0.5, "model_b": 0.0}


def battle_arrays(battles: Sequence[dict], models: Sequence[str]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(a_N, b_N, score_N): the two models' indices and model_a's score (1 win, 0.5 tie, 0
  loss) of each rated battle (winner model_a, model_b or tie; errors are left out)."""
  index = {name: i for i, name in enumerate(models)}
  rated = [b for b in battles if b.get("winner") in SCORES]
  for battle in rated:
    for side in ("model_a", "model_b"):
      if battle[side] not in index:
        raise JaxllmError(f"a battle names model '{battle[side]}', which is not one of "
                          f"{', '.join(models)}")
  a_N = np.array([index[b["model_a"]] for b in rated], np.int64)
  b_N = np.array([index[b["model_b"]] for b in rated], np.int64)
  score_N = np.array([SCORES[b["winner"]] for b in rated], np.float64)
  return a_N, b_N, score_N


def pair_counts(a_N: np.ndarray, b_N: np.ndarray, score_N: np.ndarray, num_models: int,
                picks_SxN: np.ndarray | None = None) -> np.ndarray:
  """wins_SxMxM[s, i, j]: how often i beat j (ties half) in each resample (the battles of
  `picks_SxN`, indices into the log; None: the log itself, S = 1)."""
  if picks_SxN is None:
    picks_SxN = np.arange(len(a_N))[None]
  samples = picks_SxN.shape[0]
  offset_Sx1 = (np.arange(samples) * num_models * num_models)[:, None]
  a, b, score = a_N[picks_SxN], b_N[picks_SxN], score_N[picks_SxN]
  size = samples * num_models * num_models
  wins = (np.bincount((offset_Sx1 + a * num_models + b).ravel(), score.ravel(), size)
          + np.bincount((offset_Sx1 + b * num_models + a).ravel(), (1 - score).ravel(), size))
  return wins.reshape(samples, num_models, num_models)


def fit_bradley_terry(wins_SxMxM: np.ndarray, anchor: int = 0, iterations: int = 100
                      ) -> np.ndarray:
  """Elo-scale ratings, SxM, maximising sum_ij wins_ij log sigma(x_i - x_j) (x = ln10 r)
  with x_anchor = 0: Newton's method on the other M - 1, all resamples at once."""
  samples, num_models, _ = wins_SxMxM.shape
  free = np.array([i for i in range(num_models) if i != anchor])
  games_SxMxM = wins_SxMxM + np.swapaxes(wins_SxMxM, 1, 2)
  x_SxM = np.zeros((samples, num_models))
  for _ in range(iterations):
    p_SxMxM = 1 / (1 + np.exp(x_SxM[:, None, :] - x_SxM[:, :, None]))  # sigma(x_i - x_j)
    gradient_SxM = (wins_SxMxM - games_SxMxM * p_SxMxM).sum(-1) - RIDGE * x_SxM
    weight_SxMxM = games_SxMxM * p_SxMxM * (1 - p_SxMxM)
    hessian_SxMxM = (np.eye(num_models) * weight_SxMxM.sum(-1)[:, :, None] - weight_SxMxM
                     + RIDGE * np.eye(num_models))
    step = np.linalg.solve(hessian_SxMxM[:, free][:, :, free], gradient_SxM[:, free, None])
    step = np.clip(step[..., 0], -5.0, 5.0)  # Newton from 0 rarely needs it; separation might
    x_SxM[:, free] += step
    if np.abs(step).max() < 1e-10:
      break
  return SCALE * x_SxM / np.log(10) + INITIAL


def bradley_terry(a_N, b_N, score_N, num_models: int, anchor: int = 0) -> np.ndarray:
  """The ratings (Elo scale, the anchor at 1000) of one battle log."""
  return fit_bradley_terry(pair_counts(a_N, b_N, score_N, num_models), anchor)[0]


def bootstrap(a_N, b_N, score_N, num_models: int, anchor: int = 0, rounds: int = 1000,
              seed: int = 0, chunk: int = 250) -> np.ndarray:
  """Ratings of `rounds` resampled logs (each N battles drawn with replacement), rounds x M."""
  rng = np.random.default_rng(seed)
  samples = []
  for start in range(0, rounds, chunk):
    picks = rng.integers(0, len(a_N), size=(min(chunk, rounds - start), len(a_N)))
    samples.append(fit_bradley_terry(pair_counts(a_N, b_N, score_N, num_models, picks),
                                     anchor))
  return np.concatenate(samples)


def intervals(samples_SxM: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """(lower_M, upper_M): the bootstrap's percentile interval."""
  tail = 100 * (1 - level) / 2
  lower, upper = np.percentile(samples_SxM, [tail, 100 - tail], axis=0)
  return lower, upper


def ranks(lower_M: np.ndarray, upper_M: np.ndarray) -> np.ndarray:
  """1 + how many models have a lower bound above this one's upper bound (Chatbot Arena's)."""
  return 1 + (lower_M[None, :] > upper_M[:, None]).sum(axis=1)


def online_elo(a_N, b_N, score_N, num_models: int, k: float = ONLINE_K,
               anchor: int | None = 0) -> np.ndarray:
  """Elo updated after each battle in order, every model from 1000; shifted so that the
  anchor reads 1000 (None: not shifted)."""
  rating_M = np.full(num_models, INITIAL)
  for a, b, score in zip(a_N, b_N, score_N):
    expected = 1 / (1 + 10 ** ((rating_M[b] - rating_M[a]) / SCALE))
    rating_M[a] += k * (score - expected)
    rating_M[b] -= k * (score - expected)
  return rating_M if anchor is None else rating_M - rating_M[anchor] + INITIAL


def win_rates(a_N, b_N, score_N, num_models: int) -> tuple[np.ndarray, np.ndarray]:
  """(rate_MxM, games_MxM): how often row beat column (ties half; NaN where they never
  met, and on the diagonal), and how many battles each pair had."""
  wins_MxM = pair_counts(a_N, b_N, score_N, num_models)[0]
  games_MxM = wins_MxM + wins_MxM.T
  rate_MxM = np.divide(wins_MxM, games_MxM, out=np.full_like(wins_MxM, np.nan),
                       where=games_MxM > 0)
  return rate_MxM, games_MxM.astype(np.int64)


def _logistic(features_NxF: np.ndarray, target_N: np.ndarray, iterations: int = 100
              ) -> np.ndarray:
  """The coefficients of a logistic regression on soft targets (0, 0.5, 1), Newton's method
  with the same small ridge as the ratings."""
  coef_F = np.zeros(features_NxF.shape[1])
  for _ in range(iterations):
    p_N = 1 / (1 + np.exp(-features_NxF @ coef_F))
    gradient_F = features_NxF.T @ (target_N - p_N) - RIDGE * coef_F
    hessian_FxF = (features_NxF.T * (p_N * (1 - p_N))) @ features_NxF
    step_F = np.clip(np.linalg.solve(hessian_FxF + RIDGE * np.eye(len(coef_F)), gradient_F),
                     -5.0, 5.0)
    coef_F += step_F
    if np.abs(step_F).max() < 1e-10:
      break
  return coef_F


def length_controlled(preference_N: np.ndarray, length_N: np.ndarray,
                      baseline_length_N: np.ndarray) -> dict[str, float]:
  """A model against the baseline over N battles: its raw win rate (preference 1 won, 0.5
  tie, 0 lost) and its length-controlled one, both in %, and the fitted length coefficient."""
  preference_N = np.asarray(preference_N, np.float64)
  if len(preference_N) == 0:
    return {"win_rate": float("nan"), "lc_win_rate": float("nan"), "length_coef": float("nan")}
  delta_N = np.asarray(length_N, np.float64) - np.asarray(baseline_length_N, np.float64)
  spread = delta_N.std()
  feature_N = np.tanh(delta_N / spread) if spread > 0 else np.zeros_like(delta_N)
  intercept, slope = _logistic(np.stack([np.ones_like(feature_N), feature_N], axis=1),
                               preference_N)
  return {"win_rate": 100 * float(preference_N.mean()),
          "lc_win_rate": 100 / (1 + float(np.exp(-intercept))), "length_coef": float(slope)}
