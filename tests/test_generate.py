import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import CharTokenizer
from jaxllm.errors import JaxllmError
from jaxllm.models.gpt import GPT, init_params
from jaxllm.serve import generate as generate_lib

CONFIG = ModelConfig(vocab_size=97, context_length=64, n_layer=2, n_head=4, d_model=64)
# Lengths 3, 7, 1 and 20 in one batch: every row but the longest decodes over prefill padding.
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [42], list(range(60, 80))]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def model_and_params():
  model = GPT(CONFIG)
  # At init scale (std 0.02) a GPT's argmax just repeats the last token, which would let a
  # cache that ignored the context pass. Weights x10 make the next token depend on it.
  params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x,
                        init_params(model, jax.random.key(0)))
  return model, params


def test_cached_greedy_equals_uncached(model_and_params):
  model, params = model_and_params
  cached = generate_lib.generate(model, params, PROMPTS, NEW_TOKENS, temperature=0)
  uncached = generate_lib.generate_uncached(model, params, PROMPTS, NEW_TOKENS, temperature=0)
  assert [len(row) for row in cached] == [NEW_TOKENS] * len(PROMPTS)
  # float32 ids must match exactly, token for token, not "mostly".
  assert cached == uncached
  assert all(len(set(row)) >= 5 for row in cached), cached  # not a degenerate repeat

  # Exact equality is robust, not luck: every step's top-1 logit leads the runner-up by far
  # more than the ~1e-6 by which cached and full forwards differ.
  sequences_BxL, _ = generate_lib._pad([p + new for p, new in zip(PROMPTS, cached)])
  logits_BxLxV = model.apply({"params": params}, jnp.asarray(sequences_BxL))
  for row, prompt in enumerate(PROMPTS):
    steps = slice(len(prompt) - 1, len(prompt) - 1 + NEW_TOKENS)
    top2_Nx2 = jax.lax.top_k(logits_BxLxV[row, steps], 2)[0]
    assert float(jnp.min(top2_Nx2[:, 0] - top2_Nx2[:, 1])) > 1e-4

def test_cached_sampling_equals_uncached(model_and_params):
  model, params = model_and_params
  kwargs = dict(temperature=1.0, top_k=20, top_p=0.9, seed=3)
  cached = generate_lib.generate(model, params, PROMPTS, NEW_TOKENS, **kwargs)
  assert cached == generate_lib.generate_uncached(model, params, PROMPTS, NEW_TOKENS, **kwargs)
  assert cached != generate_lib.generate(model, params, PROMPTS, NEW_TOKENS,
                                         **{**kwargs, "seed": 4})


def test_batched_equals_one_at_a_time(model_and_params):
  model, params = model_and_params
  batched = generate_lib.generate(model, params, PROMPTS, NEW_TOKENS, temperature=0)
  alone = [generate_lib.generate(model, params, [p], NEW_TOKENS, temperature=0)[0]
           for p in PROMPTS]
  assert batched == alone


def test_repeated_calls_do_not_recompile(model_and_params):
  model, params = model_and_params
  first = generate_lib.generate(model, params, PROMPTS, 8, temperature=0.7, seed=1)
  compiled = generate_lib._generate_cached._cache_size()
  # Same config, shapes and settings, other token values and seed: the compiled loop is reused.
  other_prompts = [[t + 1 for t in p] for p in PROMPTS]
  generate_lib.generate(model, params, other_prompts, 8, temperature=0.7, seed=2)
  assert generate_lib.generate(model, params, PROMPTS, 8, temperature=0.7, seed=1) == first
  assert generate_lib._generate_cached._cache_size() == compiled


# Logits with a known order: ids 4 > 1 > 7 > 2 > 0 > the rest.
LOGITS_V = np.full(10, -2.0, np.float32)
LOGITS_V[[4, 1, 7, 2, 0]] = [3.0, 2.5, 2.0, 1.0, 0.5]
DRAWS = 2000


def _draw(temperature, top_k, top_p, logits_V=LOGITS_V, seed=0):
  """DRAWS independent samples (one per row of a broadcast batch)."""
  logits_BxV = jnp.broadcast_to(jnp.asarray(logits_V), (DRAWS, len(logits_V)))
  return np.asarray(generate_lib.sample_logits(jax.random.key(seed), logits_BxV,
                                               temperature, top_k, top_p))


def test_top_k_samples_only_the_k_largest():
  ids = _draw(1.0, 3, 1.0)
  assert set(ids) == {4, 1, 7}
  # And in proportion to their renormalised probabilities (5 sigma is about 0.056 here).
  expected = jax.nn.softmax(jnp.array([3.0, 2.5, 2.0]))
  observed = np.array([np.mean(ids == i) for i in (4, 1, 7)])
  np.testing.assert_allclose(observed, expected, atol=0.06)
  # Unrestricted sampling does reach beyond them: the filter is what kept it inside.
  assert len(set(_draw(1.0, 0, 1.0))) > 3


def test_top_k_does_not_leak_through_ties():
  logits_V = np.array([5.0, 5.0, 5.0, 0.0], np.float32)
  assert len(set(_draw(1.0, 2, 1.0, logits_V))) == 2


def test_top_p_samples_only_the_nucleus():
  probs_V = np.asarray(jax.nn.softmax(jnp.asarray(LOGITS_V)))
  order = np.argsort(-probs_V)
  for top_p in (0.5, 0.8, 0.95):
    # The smallest most-likely set whose mass reaches top_p.
    size = int(np.searchsorted(np.cumsum(probs_V[order]), top_p)) + 1
    nucleus = set(order[:size].tolist())
    assert set(_draw(1.0, 0, top_p)) == nucleus, (top_p, nucleus)
  assert set(_draw(1.0, 0, 1e-6)) == {4}  # at least one token, however small p
  # top_k first, then top_p over the renormalised survivors: the top token holds 0.45 of all
  # the mass (so p=0.5 alone keeps two, above) but 0.51 of the top three's.
  assert set(_draw(1.0, 3, 0.5)) == {4}


def test_temperature_zero_is_argmax():
  logits_BxV = jax.random.normal(jax.random.key(1), (64, 97))
  tokens_B = generate_lib.sample_logits(jax.random.key(2), logits_BxV, 0, 5, 0.5)
  np.testing.assert_array_equal(tokens_B, jnp.argmax(logits_BxV, axis=-1))


def test_rows_stop_at_eot_and_emit_nothing_after(model_and_params):
  model, params = model_and_params
  for kwargs in (dict(temperature=0), dict(temperature=1.0, seed=5)):
    free = generate_lib.generate(model, params, PROMPTS, NEW_TOKENS, **kwargs)
    # Make eot a token the first row really emits mid-way: each row must then end just before
    # its own first occurrence of it, the other rows running on undisturbed.
    eot_id = next(t for i, t in enumerate(free[0]) if i >= 3 and t not in free[0][:i])
    expected = [row[:row.index(eot_id)] if eot_id in row else row for row in free]
    assert len(expected[0]) >= 3 and any(len(e) != len(expected[0]) for e in expected)
    stopped = generate_lib.generate(model, params, PROMPTS, NEW_TOKENS, eot_id=eot_id, **kwargs)
    assert stopped == expected
    assert generate_lib.generate_uncached(
        model, params, PROMPTS, NEW_TOKENS, eot_id=eot_id, **kwargs) == expected


def test_forced_eot_stops_every_row_at_once(model_and_params):
  model, params = model_and_params
  eot_id = 13
  # With ln_f's scale 0 its output is its bias; a bias along eot's (tied) embedding makes
  # eot the argmax at every position, so the loop must exit before emitting anything.
  forced = jax.tree.map(lambda x: x, params)
  forced["ln_f"] = {"scale": jnp.zeros_like(params["ln_f"]["scale"]),
                    "bias": 100.0 * params["wte"]["embedding"][eot_id]}
  assert generate_lib.generate(model, forced, PROMPTS, NEW_TOKENS, temperature=0.0,
                               eot_id=eot_id) == [[]] * len(PROMPTS)
  # Without eot_id the same model emits it as an ordinary token.
  assert generate_lib.generate(model, forced, PROMPTS[:1], 4, temperature=0.0) == [[eot_id] * 4]


def test_generation_past_the_context_slides_a_window(model_and_params):
  # 20-token prompt + 100 new tokens > context 64: the first 45 tokens come from the KV
  # cache, the rest from windows of the last 64 tokens (nanoGPT's crop), exactly as the
  # cache-free reference, which crops every step.
  model, params = model_and_params
  for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=5)):
    cached = generate_lib.generate(model, params, PROMPTS, 100, **kwargs)
    assert [len(row) for row in cached] == [100] * len(PROMPTS)
    assert cached == generate_lib.generate_uncached(model, params, PROMPTS, 100, **kwargs)
    # Within the context, the same tokens as a shorter request.
    short = generate_lib.generate(model, params, PROMPTS, 40, **kwargs)
    assert [row[:40] for row in cached] == short
  assert len(set(cached[0][60:])) >= 5  # still a varied continuation, not a stuck repeat


def test_padded_vocabulary_ids_are_never_sampled():
  # A vocabulary padded from 65 (the tokenizer's) to 72 (for tensor parallelism), with the
  # padded rows' logits made the largest: sampling and greedy decoding must skip them.
  tokenizer = CharTokenizer.from_corpus("".join(chr(c) for c in range(32, 96)))
  assert tokenizer.vocab_size == 65
  model = GPT(ModelConfig(vocab_size=72, context_length=16, n_layer=1, n_head=2, d_model=32))
  params = init_params(model, jax.random.key(0))
  # Hidden state all ones (ln_f's scale 0, bias 1): logits are the embedding rows' sums,
  # 32 for the padded ids, 16 for "*" (id 10), about 0 for the rest.
  params["wte"]["embedding"] = params["wte"]["embedding"].at[65:].set(1.0).at[10].set(0.5)
  params["ln_f"] = {"scale": jnp.zeros(32), "bias": jnp.ones(32)}
  assert generate_lib.generate(model, params, [[1]], 3, temperature=0) == [[65] * 3]  # unmasked
  for kwargs in (dict(temperature=0), dict(temperature=2.0, seed=1)):
    text = generate_lib.generate_text(model, params, tokenizer, "AB", 40, **kwargs)
    ids = generate_lib.generate(model, params, [tokenizer.encode("AB")], 40, vocab_size=65,
                                eot_id=tokenizer.eot_id, **kwargs)[0]
    assert text == tokenizer.decode(ids) and len(ids) == 40 and max(ids) < 65
    assert ids == generate_lib.generate_uncached(
        model, params, [tokenizer.encode("AB")], 40, vocab_size=65, eot_id=tokenizer.eot_id,
        **kwargs)[0]
  assert ids.count(10) > 20


def test_too_long_or_empty_requests_raise(model_and_params):
  model, params = model_and_params
  with pytest.raises(JaxllmError, match=r"a prompt of 65 tokens is longer than the context "
                                        r"length 64"):
    generate_lib.generate(model, params, [[1] * 65, [2]], 30)
  generate_lib.generate(model, params, [[1] * 64], 3)  # a full context still generates
  with pytest.raises(JaxllmError, match="prompt 1 is empty"):
    generate_lib.generate(model, params, [[1], []], 4)
  with pytest.raises(JaxllmError, match="outside"):
    generate_lib.generate(model, params, [[97]], 4)
  with pytest.raises(JaxllmError, match="top_p"):
    generate_lib.generate(model, params, [[1]], 4, top_p=0.0)


# CONFIG's 97 ids as characters: the 95 printable ASCII ones, newline and <|endoftext|>.
TEXT_TOKENIZER = CharTokenizer("".join(map(chr, range(32, 127))) + "\n")


@jax.jit
def _full_forward(params, tokens_1xC):
  return GPT(CONFIG).apply({"params": params}, tokens_1xC)[0]


def _next_logits(params, ids):
  """The reference: the plain forward pass of the whole sequence (no cache, no generate.py
  code), the logits at its last token. Padded to the context length to compile once: causal
  attention keeps the padding out of every real position."""
  tokens_1xC = np.zeros((1, CONFIG.context_length), np.int32)
  tokens_1xC[0, :len(ids)] = ids
  return _full_forward(params, tokens_1xC)[len(ids) - 1]


def test_generate_text_greedy_equals_full_forward_argmax(model_and_params):
  model, params = model_and_params
  assert TEXT_TOKENIZER.vocab_size == CONFIG.vocab_size
  prompts = ["hello", "The quick brown fox", "z"]
  texts = generate_lib.generate_text(model, params, TEXT_TOKENIZER, prompts, 12, temperature=0)
  assert generate_lib.generate_text(model, params, TEXT_TOKENIZER, prompts[0], 12,
                                    temperature=0) == texts[0]  # a str gets a str
  for prompt, text in zip(prompts, texts):
    ids = TEXT_TOKENIZER.encode(prompt)
    expected = []
    for _ in range(12):
      logits_V = _next_logits(params, ids + expected)
      top2_V = jax.lax.top_k(logits_V, 2)[0]
      # Far more than the ~1e-6 by which a cached and a full forward differ: equality is exact.
      assert float(top2_V[0] - top2_V[1]) > 1e-4
      token = int(jnp.argmax(logits_V))
      if token == TEXT_TOKENIZER.eot_id:
        break
      expected.append(token)
    assert len(expected) == 12 and len(set(expected)) >= 4, expected  # no early eot, no repeat
    assert TEXT_TOKENIZER.encode(text) == expected, (prompt, text)


def _ranks(params, prompt, text):
  """Each new token's rank among the reference's next-token logits (0: the most likely)."""
  ids, ranks = TEXT_TOKENIZER.encode(prompt), []
  for token in TEXT_TOKENIZER.encode(text):
    order_V = np.argsort(-np.asarray(_next_logits(params, ids)))
    ranks.append(int(np.flatnonzero(order_V == token)[0]))
    ids.append(token)
  return ranks


def test_generate_text_sampling_is_seeded_and_keeps_to_the_top_k(model_and_params):
  model, params = model_and_params
  prompt, new_tokens, top_k = "hello", 24, 3
  # A high temperature flattens the distribution, so the filter, not the model, decides.
  sample = functools.partial(generate_lib.generate_text, model, params, TEXT_TOKENIZER, prompt,
                             new_tokens, temperature=20.0)
  text = sample(top_k=top_k, seed=7)
  assert sample(top_k=top_k, seed=7) == text
  assert sample(top_k=top_k, seed=8) != text
  ranks = _ranks(params, prompt, text)
  assert len(ranks) == new_tokens and max(ranks) < top_k, ranks
  assert len(set(ranks)) == top_k, ranks  # it did sample, not only take the argmax
  # Unfiltered, the same temperature reaches past the k most likely: the filter kept it inside.
  assert max(_ranks(params, prompt, sample(seed=7))) >= top_k
