"""Classification: a class head on a GPT's last real token or an encoder's pooled state
(classifier.pooling), over labelled texts.

The book's ch. 6 recipe: labelled texts from data.path (classes balanced, a seeded 70/10/20
split, right-padded), batches shuffled per epoch with drop_last; periodic figures are loss
and accuracy on train and validation; the final report adds precision, recall, F1 and the
confusion matrix (summed by the evaluation step itself) on all three splits.
"""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from jaxllm.data import classification
from jaxllm.eval import figures
from jaxllm.models import heads
from jaxllm.tasks import common, losses


def make_task(config: ml_collections.ConfigDict) -> common.Task:
  train = config.train
  model, tokenizer = common.backbone(config)
  pooling = losses.pooling(config.classifier, model)
  data = classification.load(config.classifier, config.data.path, tokenizer,
                             model.config.context_length)
  with config.ignore_type():  # config.json records what ran: the classes and the length
    config.classifier.labels = ",".join(data.labels)
    config.classifier.max_length = data.max_length
    config.classifier.pooling = pooling
  head_init = functools.partial(heads.classifier_init, d_model=model.config.d_model,
                                num_classes=len(data.labels))
  params = common.finetuned_params(config, model, (head_init, common.HEAD_AXES))
  splits = {name: {**split, "weight_B": np.ones(len(split["label_B"]), np.float32)}
            for name, split in data.splits.items()}
  batches_per_epoch = classification.num_batches(splits["train"], train.batch_size, True)

  @functools.lru_cache(maxsize=1)  # one permutation per epoch, not per step
  def epoch_order(epoch):
    return np.random.default_rng((train.seed, epoch)).permutation(len(splits["train"]["label_B"]))

  def train_batch(step, rows):
    epoch, index = divmod(step, batches_per_epoch)
    picked = epoch_order(epoch)[index * train.batch_size:(index + 1) * train.batch_size]
    batch = {k: v[picked] for k, v in splits["train"].items()}
    return common.microbatches(batch, train.grad_accum, rows)

  def split_batches(split, limit=0):
    for i, batch in enumerate(classification.batches(splits[split], train.batch_size)):
      if limit and i >= limit:
        return
      yield common.pad_rows(batch, train.batch_size)

  def report_figures(split, sums):
    confusion_CxC = np.rint(sums["confusion"]).astype(np.int64)
    metrics = figures.classification_metrics(confusion_CxC, data.labels)
    return {f"{split}_accuracy": metrics["accuracy"],
            f"{split}_loss": float(sums["loss"] / max(sums["count"], 1e-9)), split: metrics}

  sums = dict(backbone=model, lora_scale=params.lora_scale, pooling=pooling)
  sizes = ", ".join(f"{k} {len(v['label_B'])}" for k, v in data.splits.items())
  return common.Task(
      model=model, tokenizer=tokenizer, init_params=params.init, param_axes=params.axes,
      loss_fn=functools.partial(losses.classification_loss, backbone=model,
                                lora_scale=params.lora_scale, pooling=pooling,
                                deterministic=model.config.dropout == 0.0),
      eval_fn=functools.partial(losses.classification_sums, **sums),
      train_batch=train_batch,
      eval_batches=functools.partial(split_batches, limit=train.eval_batches),
      token_key="tokens_BxL",
      export=functools.partial(common.export_finetuned, lora_scale=params.lora_scale),
      report=common.finetuned_report("classify"), trainable=params.trainable,
      report_splits=classification.SPLITS, report_batches=split_batches,
      report_fn=functools.partial(losses.classification_sums, **sums,
                                  num_classes=len(data.labels)),
      report_figures=report_figures, saved_params=params.saved,
      pretrained_into=(("backbone",),), batches_per_epoch=batches_per_epoch, lm_head=False,
      description=(f"{sizes} examples, classes {data.labels}, padded to {data.max_length} "
                   f"tokens (pad id {data.pad_id}), {pooling} pooling; {params.description}"))
