"""Preference tuning with DPO (Rafailov et al. 2023), as the book's bonus chapter does it.

Records from data.path hold an instruction, an optional input and two responses, "chosen"
and "rejected"; each becomes prompt + response + <|endoftext|> in the instruction template,
the prompt's tokens masked. The policy starts from train.init_from (an instruction-tuned
model) and a frozen copy of it is the reference. Figures, per evaluation and in the final
report: DPO loss, the chosen and rejected rewards (log pi / pi_ref), their margin, and the
reward accuracy (how often chosen beats rejected).
"""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from jaxllm.data import instruction
from jaxllm.errors import JaxllmError
from jaxllm.tasks import common, losses

KEYS = ("instruction", "chosen", "rejected")


def encode_pairs(records: list[dict], tokenizer, template: str) -> instruction.Encoded:
  """Chosen and rejected of each record, interleaved: pair i is rows 2i and 2i + 1."""
  both = [{**r, "output": r[key]} for r in records for key in ("chosen", "rejected")]
  return instruction.encode(both, tokenizer, template)


def pair_batch(pairs: instruction.Encoded, rows, **shape) -> common.Batch:
  """{"inputs_BxPxL", "targets_BxPxL", "weights_BxPxL", "weight_B"} of pairs `rows`: chosen
  and rejected padded to one length, prompt and padding weighted 0."""
  flat = instruction.make_batch(pairs, np.stack([2 * np.asarray(rows), 2 * np.asarray(rows) + 1],
                                                axis=1).reshape(-1), **shape, mask_prompt=True)
  batch = {k.replace("_BxL", "_BxPxL"): v.reshape(len(rows), 2, -1) for k, v in flat.items()}
  return {**batch, "weight_B": np.ones(len(rows), np.float32)}


def batch_shape(config: ml_collections.ConfigDict, model, tokenizer) -> dict:
  """pair_batch's padding keywords from `config.instruct` (the prompt is always masked)."""
  shape = instruction.batch_options(config.instruct, model.config.context_length,
                                    tokenizer.eot_id)
  del shape["mask_prompt"]
  return shape


def load(config: ml_collections.ConfigDict, tokenizer):
  """(records, interleaved pairs) of each split."""
  records = instruction.load_records(config.instruct, config.data.path, config.train.seed,
                                     required=KEYS)
  return records, {name: encode_pairs(split, tokenizer, config.instruct.template)
                   for name, split in records.items()}


def make_task(config: ml_collections.ConfigDict) -> common.Task:
  train = config.train
  if not train.init_from:
    raise JaxllmError("train.task=dpo tunes a model against itself: set train.init_from to "
                      "its run directory (e.g. an instruct_alpaca run)")
  model, tokenizer = common.backbone(config)
  common.require_decoder(model, "dpo")
  records, pairs = load(config, tokenizer)
  shape = batch_shape(config, model, tokenizer)
  pair_lengths = {k: np.maximum(v.lengths[0::2], v.lengths[1::2]) for k, v in pairs.items()}
  sampler = instruction.Batches(pair_lengths["train"], train.batch_size, train.seed,
                                config.instruct.bucket_batches)
  params = common.finetuned_params(config, model, reference=True)
  epoch_rows = functools.lru_cache(maxsize=1)(sampler.epoch)
  dpo = dict(backbone=model, beta=float(config.dpo.beta),
             average=bool(config.dpo.average_logprobs), lora_scale=params.lora_scale)

  def train_batch(step, rows):
    epoch, index = divmod(step, sampler.batches_per_epoch)
    batch = pair_batch(pairs["train"], epoch_rows(epoch)[index], **shape)
    return common.microbatches(batch, train.grad_accum, rows)

  def split_batches(split, limit=0):
    count = min(limit * train.batch_size or len(records[split]), len(records[split]))
    order = np.argsort(pair_lengths[split][:count], kind="stable")
    for i in range(0, count, train.batch_size):
      yield common.pad_rows(pair_batch(pairs[split], order[i:i + train.batch_size], **shape),
                            train.batch_size)

  return common.Task(
      model=model, tokenizer=tokenizer, init_params=params.init, param_axes=params.axes,
      loss_fn=functools.partial(losses.dpo_loss, **dpo,
                                deterministic=model.config.dropout == 0.0),
      eval_fn=functools.partial(losses.dpo_sums, **dpo),
      train_batch=train_batch,
      eval_batches=functools.partial(split_batches, limit=train.eval_batches),
      token_key="inputs_BxPxL",
      export=functools.partial(common.export_finetuned, lora_scale=params.lora_scale),
      report=common.finetuned_report("dpo"), trainable=params.trainable,
      report_splits=("train", "val", "test"), report_batches=split_batches,
      saved_params=params.saved,
      pretrained_into=(("backbone",), ("reference",)),
      batches_per_epoch=sampler.batches_per_epoch,
      reference_forward=True,
      description=(f"{', '.join(f'{k} {len(v)}' for k, v in records.items())} preference "
                   f"pairs ({config.instruct.template} template, prompt masked), beta "
                   f"{config.dpo.beta}; {params.description}"))
