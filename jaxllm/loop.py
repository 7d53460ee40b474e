"""`jaxllm train`: the training run, a straight line from config to a saved model.

Loads and tokenizes the data, builds the model and the mesh, then loops over the jitted
`train_step` with a progress bar, evaluating every `train.eval_every` steps and saving a
checkpoint every `checkpoint.every_steps` (a run directory holding checkpoints resumes from the
latest; SIGTERM saves and stops), and ends with the parameters, metrics, a loss curve and a
text sample in the run directory.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
from tqdm.auto import tqdm

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import data as data_lib
from jaxllm import generate as generate_lib
from jaxllm import metrics as metrics_lib
from jaxllm import multihost
from jaxllm import run_io
from jaxllm import sharding
from jaxllm import train as train_lib
from jaxllm.errors import JaxllmError, Preempted
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
  multihost.initialize()  # before anything touches a device
  main = multihost.is_main()  # process 0 prints and writes; every process computes
  log = print if main else (lambda *args, **kwargs: None)

  # Data first: the tokenizer decides the vocabulary size. Process 0 tokenizes and caches
  # first, so processes sharing a disk never write one cache at once.
  context_length = config_lib.model_config(config.model, vocab_size=1).context_length
  if main:
    tokens = data_lib.load_token_data(config.data, context_length=context_length)
  multihost.sync("jaxllm: tokens cached")
  if not main:
    tokens = data_lib.load_token_data(config.data, context_length=context_length)
  model_config = config_lib.model_config(config.model, tokens.tokenizer.vocab_size)
  model = GPT(model_config)
  for key in ("n_layer", "n_head", "d_model", "context_length", "vocab_size", "qkv_bias"):
    config.model[key] = getattr(model_config, key)  # config.json records what ran

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh.rules)
  config.mesh.rules = rules  # config.json records the whole table
  sharding.check_batch(train.batch_size, train.grad_accum, mesh, rules)
  sharding.check_divisible(model, mesh, rules)
  batches = data_lib.train_batches(tokens.train, config.data, train.batch_size, context_length,
                                   seed=train.seed, microbatches=train.grad_accum)
  total_steps = train.steps
  if train.epochs > 0:
    if not hasattr(batches, "batches_per_epoch"):
      raise JaxllmError("train.epochs needs data.sampling=sliding (random windows have no "
                        "epochs); set train.steps instead")
    total_steps = train.epochs * batches.batches_per_epoch
  train.steps = total_steps

  workdir.mkdir(parents=True, exist_ok=True)  # every process: Orbax saves are collective
  if not config.checkpoint.resume and main:
    checkpoint_lib.remove(workdir / "checkpoints")  # start over
  multihost.sync("jaxllm: old checkpoints removed")  # before any process opens the folder
  manager = checkpoint_lib.make_manager(workdir / "checkpoints", config.checkpoint)
  if main:
    run_io.save_run_files(workdir, config, tokens.tokenizer)

  optimizer = train_lib.make_optimizer(train, total_steps)
  init_rng, _ = jax.random.split(jax.random.key(train.seed))  # dropout draws from state.rng
  # Created in their shards: FSDP parameters are never whole on one device.
  shardings = sharding.state_shardings(model, optimizer, mesh, rules)
  params = jax.jit(functools.partial(init_params, model),
                   out_shardings=shardings.params)(init_rng)
  if train.init_from:  # pretrained weights: another run, or GPT-2's through `jaxllm convert`
    params = run_io.load_params(train.init_from, checkpoint_lib.abstract_like(params))
  state = jax.jit(functools.partial(train_lib.create_train_state, optimizer=optimizer,
                                    seed=train.seed + 1), out_shardings=shardings)(params)
  start_step = 0
  if manager.latest_step() is not None:
    # The fresh state's shapes and shardings are the target: a checkpoint saved on another
    # mesh is resharded onto this one.
    state, start_step = checkpoint_lib.restore(manager, checkpoint_lib.abstract_like(state))
    log(f"resuming from step {start_step} in {manager.directory} "
        f"(--config.checkpoint.resume=false starts over)")
  history = metrics_lib.read_records(workdir / "metrics.jsonl", start_step) if start_step else []
  if main:
    (workdir / "metrics.jsonl").unlink(missing_ok=True)
  n_params = count_params(params)
  flops_per_token = train_lib.flops_per_token(model, n_params)
  peak_flops = train.peak_flops or metrics_lib.measure_peak_flops(model_config.dtype)
  tokens_per_step = train.batch_size * context_length

  log(f"model: {n_params:,} parameters ({model_config.n_layer} layers, {model_config.n_head} "
      f"heads, d_model {model_config.d_model}, context {context_length}, vocab "
      f"{model_config.vocab_size}, {model_config.dtype})")
  log(f"data: {len(tokens.train):,} train / {len(tokens.val):,} validation tokens "
      f"({config.data.dataset}, tokenizer {tokens.tokenizer.name})")
  mib_per_device = {name: sharding.bytes_per_device(getattr(state, name), getattr(shardings, name))
                    / 2**20 for name in ("params", "opt_state")}
  log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
      f"device(s) in {jax.process_count()} process(es); per device: parameters "
      f"{mib_per_device['params']:.2f} MiB, optimizer state {mib_per_device['opt_state']:.2f} MiB")
  log(f"batch: {train.batch_size} x {context_length} tokens ({train.grad_accum} "
      f"microbatch(es)), {train.batch_size // sharding.data_parallel_size(mesh, rules)} "
      f"sequences per device; {total_steps} steps")
  log(f"MFU: {flops_per_token / 1e6:.2f} MFLOP/token (6N + 12 L d T) against "
      f"{peak_flops / 1e9:.0f} GFLOP/s per device "
      f"({'given' if train.peak_flops else 'measured matmul'})")

  step_fn = sharding.jit_train_step(model, optimizer, mesh, rules)
  eval_fn = sharding.jit_eval_step(model, mesh, rules)
  # Each process reads only the rows of a global batch its devices hold.
  train_shape = (train.grad_accum, train.batch_size // train.grad_accum, context_length)
  train_sharding = sharding.batch_sharding(mesh, rules, leading_axes=1)
  train_rows = multihost.process_rows(train_sharding, train_shape, axis=1)
  eval_shape = (train.batch_size, context_length)
  eval_sharding = sharding.batch_sharding(mesh, rules)
  eval_rows = multihost.process_rows(eval_sharding, eval_shape, axis=0)

  def global_batch(rows, batch_sharding, shape):
    return {k: multihost.global_array(v, batch_sharding, shape) for k, v in rows.items()}

  def evaluate(params) -> dict[str, float]:
    losses = {}
    for split, split_tokens in (("train_loss", tokens.train), ("val_loss", tokens.val)):
      total, count = 0.0, 0.0
      # A fixed seed, other than training's: every evaluation sees the same batches.
      for batch in data_lib.eval_batches(split_tokens, config.data, train.batch_size,
                                         context_length, train.eval_batches, seed=train.seed + 1):
        rows = {k: v[eval_rows] for k, v in data_lib.pad_batch(batch, train.batch_size).items()}
        loss_sum, n = eval_fn(params, global_batch(rows, eval_sharding, eval_shape))
        total, count = total + float(loss_sum), count + float(n)
      losses[split] = total / count
    return losses

  writer = metrics_lib.MetricsWriter(workdir / "metrics.jsonl" if main else os.devnull)
  for record in history:
    writer.write(record)
  first = evaluate(state.params)
  if not start_step:
    writer.write({"step": 0, **first})
  log(f"step {start_step}: train loss {first['train_loss']:.4f}, "
      f"val loss {first['val_loss']:.4f}")
  schedule = train_lib.learning_rate_schedule(train, total_steps)

  bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
             disable=not (progress and main), dynamic_ncols=True)
  interval_start, interval_steps = time.perf_counter(), 0
  train_start = time.perf_counter()
  eval_time = 0.0
  last_eval = first
  with jax.set_mesh(mesh), checkpoint_lib.PreemptionWatch() as preemption:
    for step in range(start_step, total_steps):
      batch = batches.batch(step, rows=train_rows)
      state, step_metrics = step_fn(state, global_batch(batch, train_sharding, train_shape))
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
          if main:
            bar.write(f"step {done}: train loss {last_eval['train_loss']:.4f}, "
                      f"val loss {last_eval['val_loss']:.4f}")
        writer.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}",
                        mfu=f"{record['mfu']:.1%}")
        bar.update(interval_steps)
        interval_start, interval_steps = time.perf_counter(), 0
      stop = preemption.reached(manager, done)  # SIGTERM: save now, exit, resume later
      checkpoint_lib.save(manager, done, state, config, tokens.tokenizer.to_json(),
                          val_loss=last_eval["val_loss"] if is_eval else None,
                          force=bool(stop) or done == total_steps)
      if stop:
        bar.close()
        writer.close()
        manager.close()  # waits for the save
        raise Preempted(done, manager.directory, stop)
  bar.close()
  train_time = time.perf_counter() - train_start - eval_time
  writer.close()
  manager.close()  # waits for the last save

  run_io.save_params(workdir, state.params)  # every process writes its shards
  params = multihost.host_copy(state.params)  # collective too: whole params for the sample
  summary = {
      "steps": total_steps,
      "train_loss": last_eval["train_loss"],
      "val_loss": last_eval["val_loss"],
      "train_seconds": train_time,
      "steps_per_s": (total_steps - start_step) / max(train_time, 1e-9),
  }
  if not main:
    return summary
  metrics_lib.plot_losses(writer.records, workdir / "loss.png",
                          title=f"{config.data.dataset}: {n_params / 1e6:.2f}M parameters")
  sample = generate_lib.generate_text(
      model, params, tokens.tokenizer, train.sample_prompt,
      max_new_tokens=min(train.sample_tokens, context_length - len(
          tokens.tokenizer.encode(train.sample_prompt))),
      temperature=0.8, top_k=200, seed=train.seed)
  (workdir / "sample.txt").write_text(train.sample_prompt + sample)

  summary["wall_seconds"] = time.perf_counter() - start_time
  print(f"--- sample (temperature 0.8, top-k 200) ---\n{train.sample_prompt}{sample}\n---")
  print(f"step {total_steps}: train loss {summary['train_loss']:.4f}, "
        f"val loss {summary['val_loss']:.4f}; {summary['steps_per_s']:.1f} steps/s, "
        f"wall time {summary['wall_seconds']:.0f} s; outputs in {workdir}")
  return summary
