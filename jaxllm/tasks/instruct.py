"""Instruction tuning: Alpaca-style records, next-token loss on the response (and, unless
instruct.mask_prompt, on the prompt), never on padding.

The book's ch. 7 recipe: records from data.path cut 85/10/5 (train/test/validation), the
Alpaca template, <|endoftext|> appended and used as padding, batches grouped by length. The
final report adds the losses over the whole train and validation splits, greedy responses to
the test prompts and, with judge.url, their scores.
"""

from __future__ import annotations

import functools
import json

import ml_collections

from jaxllm.data import instruction
from jaxllm.eval import responses
from jaxllm.tasks import common, losses
from jaxllm.training import multihost


def make_task(config: ml_collections.ConfigDict) -> common.Task:
  train = config.train
  model, tokenizer = common.backbone(config)
  common.require_decoder(model, "instruct")
  records, encoded = instruction.load(config.instruct, config.data.path, tokenizer, train.seed)
  shape = instruction.batch_options(config.instruct, model.config.context_length,
                                    tokenizer.eot_id)
  sampler = instruction.Batches(encoded["train"].lengths, train.batch_size, train.seed,
                                config.instruct.bucket_batches)
  params = common.finetuned_params(config, model)
  epoch_rows = functools.lru_cache(maxsize=1)(sampler.epoch)

  def train_batch(step, rows):
    epoch, index = divmod(step, sampler.batches_per_epoch)
    batch = instruction.make_batch(encoded["train"], epoch_rows(epoch)[index], **shape)
    return common.microbatches(batch, train.grad_accum, rows)

  def split_batches(split, limit=0):
    for rows in instruction.eval_batches(encoded[split], train.batch_size,
                                         limit=limit * train.batch_size):
      yield common.pad_rows(instruction.make_batch(encoded[split], rows, **shape),
                            train.batch_size)

  def report(workdir, params, figures):
    """Greedy responses to the test prompts (the book's file) and, with judge.url, their
    scores; every process generates (the parameters are sharded), process 0 writes."""
    main = multihost.is_main()
    entries = responses.generate_responses(
        model, params["backbone"], tokenizer, records["test"], template=config.instruct.template,
        max_new_tokens=config.instruct.max_new_tokens,
        batch_size=config.instruct.generate_batch_size, progress=main)
    path = workdir / responses.RESPONSES_FILE
    if main:
      path.write_text(json.dumps(entries, indent=4) + "\n")
    figures = {**figures, "task": "instruct", "responses": str(path)}
    if config.judge.url and main:  # one process asks the judge
      judged = responses.judge_responses(entries, url=config.judge.url, model=config.judge.model,
                                        template=config.instruct.template,
                                        timeout=config.judge.timeout, progress=main)
      figures.update({k: v for k, v in judged.items() if k != "scores"})
    return figures

  return common.Task(
      model=model, tokenizer=tokenizer, init_params=params.init, param_axes=params.axes,
      loss_fn=functools.partial(losses.instruction_loss, backbone=model,
                                lora_scale=params.lora_scale,
                                deterministic=model.config.dropout == 0.0),
      eval_fn=functools.partial(losses.instruction_sums, backbone=model,
                                lora_scale=params.lora_scale),
      train_batch=train_batch,
      eval_batches=functools.partial(split_batches, limit=train.eval_batches),
      token_key="inputs_BxL",
      export=functools.partial(common.export_finetuned, lora_scale=params.lora_scale),
      report=report, weight_fn=losses.target_weight, trainable=params.trainable,
      report_splits=("train", "val"), report_batches=split_batches, saved_params=params.saved,
      pretrained_into=(("backbone",),), batches_per_epoch=sampler.batches_per_epoch,
      description=(f"{', '.join(f'{k} {len(v)}' for k, v in records.items())} records "
                   f"({config.instruct.template} template, prompt masked: "
                   f"{config.instruct.mask_prompt}); {params.description}"))
