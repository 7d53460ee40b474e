"""Language-model pretraining: next-token prediction on windows of a tokenized corpus.

Data comes from `config.data` (a TFDS catalog dataset or local text, tokenized once and
cached); batches are random or sliding windows as a pure function of (seed, step); the
final report is a loss curve (the trainer's) and a text sample.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import ml_collections

from jaxllm import data as data_lib
from jaxllm.models.gpt import init_params, logical_axes
from jaxllm.serve import generate as generate_lib
from jaxllm.tasks import common
from jaxllm.training import multihost
from jaxllm.training import step as train_lib


def model_functions(model, seed: int) -> dict:
  """The task's parameters, loss and evaluation sums: what `jaxllm preflight` compiles without
  the data."""
  def eval_fn(params, batch):
    loss_sum, count = train_lib.eval_step(params, batch, model=model)
    return {"loss": loss_sum, "count": count}

  return dict(
      # The seed's first half: state.rng (dropout) draws from train.seed + 1.
      init_params=lambda: init_params(model, jax.random.split(jax.random.key(seed))[0]),
      param_axes=logical_axes(model),
      loss_fn=functools.partial(train_lib.lm_loss, model=model,
                                deterministic=model.config.dropout == 0.0),
      eval_fn=eval_fn)


def make_task(config: ml_collections.ConfigDict) -> common.Task:
  common.check_lm_options(config)
  train = config.train
  tokens = common.token_data(config)
  model, tokenizer = common.backbone(config, tokens.tokenizer)
  common.require_decoder(model, "lm", "mlm")
  context_length = model.config.context_length
  batches = data_lib.train_batches(tokens.train, config.data, train.batch_size, context_length,
                                   seed=train.seed, microbatches=train.grad_accum)

  def eval_batches(split):
    # A fixed seed, other than training's: every evaluation sees the same batches.
    split_tokens = tokens.train if split == "train" else tokens.val
    for batch in data_lib.eval_batches(split_tokens, config.data, train.batch_size,
                                       context_length, train.eval_batches, seed=train.seed + 1):
      yield data_lib.pad_batch(batch, train.batch_size)

  def report(workdir: pathlib.Path, params, figures):
    if train.sample_tokens <= 0:  # no sample asked for: nothing to compile
      return figures
    # Every process samples (the parameters are sharded over all of them); process 0 writes.
    prompt = train.sample_prompt
    sample = generate_lib.generate_text(
        model, params, tokenizer, prompt, max_new_tokens=train.sample_tokens,
        temperature=0.8, top_k=200, seed=train.seed)
    if multihost.is_main():
      (workdir / "sample.txt").write_text(prompt + sample)
      print(f"--- sample (temperature 0.8, top-k 200) ---\n{prompt}{sample}\n---")
    return figures

  return common.Task(
      model=model, tokenizer=tokenizer, **model_functions(model, train.seed),
      train_batch=lambda step, rows: batches.batch(step, rows=rows),
      eval_batches=eval_batches,
      token_key="inputs",
      export=lambda params: {"params": params},
      report=report,
      batches_per_epoch=getattr(batches, "batches_per_epoch", None),
      description=(f"{len(tokens.train):,} train / {len(tokens.val):,} validation tokens "
                   f"({config.data.dataset}, tokenizer {tokenizer.name})"))
