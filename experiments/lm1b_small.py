"""A small web-text pretraining run that trains on a 2-core CPU in minutes: lm1b.

The One Billion Word benchmark (TFDS `lm1b`: ~30M news sentences), GPT-2's BPE, a 4-layer
d_model-256 GPT at context 128, 200 steps of 8 sequences. It exercises the whole path of a
large corpus at a size a laptop takes: TFDS's download (1.7 GB) and preparation (once; tens
of minutes), streaming tokenization into sharded token files on every core (once: ~4 GB of
text, ~1B tokens; at the 15-20 MB/s measured on 2 cores, about 4 minutes), random windows
read through memory maps, batches prefetched onto the devices.

    jaxllm train --config experiments/lm1b_small.py

Any local corpus takes its place: --config.data.dataset=text --config.data.path=FILE_OR_GLOB
--config.data.val_split=''. Measured on a 2-core CPU with Tiny Shakespeare in lm1b's place
(lm1b cannot be downloaded there): 16.0M parameters, 200 steps in 191 s wall time (1.2
steps/s), validation loss 10.82 -> 5.53.
"""

from jaxllm.config import default_config

# Before training, predictions are near uniform over GPT-2's 50,257 tokens: ln 50,257 = 10.82.
EXPECTED = {"initial_val_loss": ("between", 10.6, 11.1, "uniform over 50,257 tokens: 10.82")}


def get_config():
  c = default_config()
  c.model.n_layer = 4
  c.model.n_head = 4
  c.model.d_model = 256
  c.model.context_length = 128
  c.model.bias = False
  c.model.dropout = 0.0

  c.data.dataset = "lm1b"
  c.data.train_split = "train"
  c.data.val_split = "test"
  c.data.tokenizer = "gpt2"
  c.data.separator = "<|endoftext|>"
  c.data.sampling = "random"

  c.train.steps = 200
  c.train.batch_size = 8
  c.train.learning_rate = 1e-3
  c.train.min_learning_rate = 1e-4
  c.train.warmup_steps = 20
  c.train.eval_every = 100
  c.train.eval_batches = 5
  c.train.log_every = 10
  c.train.sample_prompt = "The"
  c.train.sample_tokens = 40
  c.checkpoint.every_steps = 100
  return c
