"""`jaxllm train`: the training run, a straight line from config to a saved model.

Loads and tokenizes the data, builds the model and the mesh, then loops over the jitted
`train_step` with a progress bar, evaluating every `train.eval_every` steps, and ends with
the parameters, metrics, a loss curve and a text sample in the run directory.
"""

from __future__ import annotations

import functools
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxllm import config as config_lib
from jaxllm import data as data_lib
from jaxllm import generate as generate_lib
from jaxllm import metrics as metrics_lib
from jaxllm import run_io
from jaxllm import sharding
from jaxllm import train as train_lib
from jaxllm.errors import JaxllmError
from jaxllm.model import GPT, count_params, init_params


def _check_train_config(train: ml_collections.ConfigDict) -> None:
  if train.batch_size % train.grad_accum:
    raise JaxllmError(f"train.batch_size={train.batch_size} is not divisible by "
                      f"train.grad_accum={train.grad_accum}")
  if train.schedule not in ("cosine", "constant"):
    raise JaxllmError(f"train.schedule must be cosine or constant, got '{train.schedule}'")
  if train.steps <= 0 and train.epochs <= 0:
    raise JaxllmError("set train.steps (or train.epochs) to a positive number")


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        progress: bool = True) -> dict[str, Any]:
  """Trains a model as `config` says; returns the final figures (also printed)."""
  start_time = time.perf_counter()
  workdir = pathlib.Path(workdir)
  train = config.train
  _check_train_config(train)

  # Data first: the tokenizer decides the vocabulary size.
  context_length = config_lib.model_config(config.model, vocab_size=1).context_length
  tokens = data_lib.load_token_data(config.data, context_length=context_length)
  model_config = config_lib.model_config(config.model, tokens.tokenizer.vocab_size)
  model = GPT(model_config)
  for key in ("n_layer", "n_head", "d_model", "context_length", "vocab_size", "qkv_bias"):
    config.model[key] = getattr(model_config, key)  # config.json records what ran

  mesh = sharding.make_mesh(config.mesh)
  per_step = train.batch_size
  if per_step % sharding.data_parallel_size(mesh) or (
      (per_step // train.grad_accum) % sharding.data_parallel_size(mesh)):
    raise JaxllmError(f"microbatch of {per_step // train.grad_accum} sequences "
                      f"(train.batch_size / train.grad_accum) is not divisible by the "
                      f"{sharding.data_parallel_size(mesh)} data-parallel devices (mesh.data * mesh.fsdp)")
  batches = data_lib.train_batches(tokens.train, config.data, train.batch_size, context_length,
                                   seed=train.seed, microbatches=train.grad_accum)
  total_steps = train.steps
  if train.epochs > 0:
    if not hasattr(batches, "batches_per_epoch"):
      raise JaxllmError("train.epochs needs data.sampling=sliding (random windows have no "
                        "epochs); set train.steps instead")
    total_steps = train.epochs * batches.batches_per_epoch
  train.steps = total_steps

  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").unlink(missing_ok=True)
  run_io.save_run_files(workdir, config, tokens.tokenizer)

  optimizer = train_lib.make_optimizer(train, total_steps)
  init_rng, dropout_seed = jax.random.split(jax.random.key(train.seed))
  with jax.set_mesh(mesh):
    params = jax.jit(functools.partial(init_params, model),
                     out_shardings=sharding.replicated(mesh))(init_rng)
  state = train_lib.create_train_state(params, optimizer, seed=train.seed + 1)
  n_params = count_params(params)
  flops_per_token = train_lib.flops_per_token(model, n_params)
  peak_flops = train.peak_flops or metrics_lib.measure_peak_flops(model_config.dtype)
  tokens_per_step = train.batch_size * context_length

  print(f"model: {n_params:,} parameters ({model_config.n_layer} layers, {model_config.n_head} "
        f"heads, d_model {model_config.d_model}, context {context_length}, vocab "
        f"{model_config.vocab_size}, {model_config.dtype})")
  print(f"data: {len(tokens.train):,} train / {len(tokens.val):,} validation tokens "
        f"({config.data.dataset}, tokenizer {tokens.tokenizer.name})")
  print(f"mesh: {dict(mesh.shape)} over {len(jax.devices())} {jax.devices()[0].platform} "
        f"device(s); batch {train.batch_size} x {context_length} tokens "
        f"({train.grad_accum} microbatch(es)), {total_steps} steps")
  print(f"MFU: {flops_per_token / 1e6:.2f} MFLOP/token (6N + 12 L d T) against "
        f"{peak_flops / 1e9:.0f} GFLOP/s per device "
        f"({'given' if train.peak_flops else 'measured matmul'})")

  step_fn = jax.jit(functools.partial(train_lib.train_step, model=model, optimizer=optimizer),
                    donate_argnums=0)
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, model=model))
  batch_sharding = sharding.batch_sharding(mesh, leading_axes=1)
  eval_sharding = sharding.batch_sharding(mesh)

  def evaluate(params) -> dict[str, float]:
    losses = {}
    for split, split_tokens in (("train_loss", tokens.train), ("val_loss", tokens.val)):
      total, count = 0.0, 0.0
      # A fixed seed, other than training's: every evaluation sees the same batches.
      for batch in data_lib.eval_batches(split_tokens, config.data, train.batch_size,
                                         context_length, train.eval_batches, seed=train.seed + 1):
        loss_sum, n = eval_fn(params, jax.device_put(batch, eval_sharding))
        total, count = total + float(loss_sum), count + float(n)
      losses[split] = total / count
    return losses

  writer = metrics_lib.MetricsWriter(workdir / "metrics.jsonl")
  first = evaluate(state.params)
  writer.write({"step": 0, **first})
  print(f"step 0: train loss {first['train_loss']:.4f}, val loss {first['val_loss']:.4f}")
  schedule = train_lib.learning_rate_schedule(train, total_steps)

  bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress,
             dynamic_ncols=True)
  interval_start, interval_steps = time.perf_counter(), 0
  train_start = time.perf_counter()
  eval_time = 0.0
  last_eval = first
  with jax.set_mesh(mesh):
    for step in range(total_steps):
      batch = batches.batch(step)
      state, step_metrics = step_fn(state, jax.device_put(batch, batch_sharding))
      interval_steps += 1
      done = step + 1
      is_eval = done % train.eval_every == 0 or done == total_steps
      if done % train.log_every == 0 or is_eval:
        loss = float(step_metrics["loss"])  # waits for the step: timing is honest
        elapsed = time.perf_counter() - interval_start
        if not math.isfinite(loss):
          bar.close()
          writer.close()
          raise JaxllmError(f"loss became {loss} at step {done} (lower train.learning_rate or "
                            f"raise train.warmup_steps; files already in {workdir} are kept)")
        tokens_per_s = interval_steps * tokens_per_step / elapsed
        record = {"step": done, "loss": loss, "lr": float(schedule(step)),
                  "grad_norm": float(step_metrics["grad_norm"]), "tokens_per_s": tokens_per_s,
                  "mfu": tokens_per_s * flops_per_token / (peak_flops * len(jax.devices()))}
        if is_eval:
          eval_start = time.perf_counter()
          last_eval = evaluate(state.params)
          eval_time += time.perf_counter() - eval_start
          record.update(last_eval)
          bar.write(f"step {done}: train loss {last_eval['train_loss']:.4f}, "
                    f"val loss {last_eval['val_loss']:.4f}")
        writer.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}",
                        mfu=f"{record['mfu']:.1%}")
        bar.update(interval_steps)
        interval_start, interval_steps = time.perf_counter(), 0
  bar.close()
  train_time = time.perf_counter() - train_start - eval_time
  writer.close()

  params = jax.device_get(state.params)
  run_io.save_params(workdir, params)
  metrics_lib.plot_losses(writer.records, workdir / "loss.png",
                          title=f"{config.data.dataset}: {n_params / 1e6:.2f}M parameters")
  sample = generate_lib.generate_text(
      model, params, tokens.tokenizer, train.sample_prompt,
      max_new_tokens=min(train.sample_tokens, context_length - len(
          tokens.tokenizer.encode(train.sample_prompt))),
      temperature=0.8, top_k=200, seed=train.seed)
  (workdir / "sample.txt").write_text(train.sample_prompt + sample)

  summary = {
      "steps": total_steps,
      "train_loss": last_eval["train_loss"],
      "val_loss": last_eval["val_loss"],
      "train_seconds": train_time,
      "steps_per_s": total_steps / train_time,
      "wall_seconds": time.perf_counter() - start_time,
  }
  print(f"--- sample (temperature 0.8, top-k 200) ---\n{train.sample_prompt}{sample}\n---")
  print(f"step {total_steps}: train loss {summary['train_loss']:.4f}, "
        f"val loss {summary['val_loss']:.4f}; {summary['steps_per_s']:.1f} steps/s, "
        f"wall time {summary['wall_seconds']:.0f} s; outputs in {workdir}")
  return summary
