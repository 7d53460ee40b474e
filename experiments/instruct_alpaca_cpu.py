"""The ch. 7 instruction finetuning at CPU size, from scratch: no pretrained weights needed.

The book's data, split (935 / 110 test / 55 validation, no shuffling), Alpaca template, EOS
and padding mask, batch 8 and seed 123, on a 2-layer, 64-wide GPT with context 128 trained
from random initialisation (AdamW, lr 1e-3, 2 epochs). A model this small learns the
template's shape, not the answers: the point is the pipeline (validation loss falls, the
responses file in the book's format), in a few minutes on 2 CPU cores.

    jaxllm finetune --config experiments/instruct_alpaca_cpu.py \
        --config.data.path=/path/to/instruction-data.json
"""

import pathlib

from jaxllm.config import load_config

# For `jaxllm reproduce --all --cpu`: sized for a 2-core CPU; DATA is the file in the
# data folder that data.path takes.
CPU = True
DATA = "instruction-data.json"

# jaxllm, 2-core CPU: see docs/finetuning.md for the measured figures.
EXPECTED = {"val_loss": ("<=", 4.0, "jaxllm, 2-core CPU: 2.54")}


def get_config():
  c = load_config(pathlib.Path(__file__).with_name("instruct_alpaca.py"))
  c.train.init_from = ""  # from scratch
  c.model.n_layer = 2
  c.model.n_head = 2
  c.model.d_model = 64
  c.model.context_length = 128
  c.instruct.max_length = 0  # the context length
  c.instruct.pad_multiple = 32  # texts are 41-92 tokens: three shapes to compile
  c.instruct.max_new_tokens = 32
  c.instruct.generate_batch_size = 128  # all 110 test prompts in one batch: one compile
  c.judge.url = ""

  c.train.learning_rate = 1e-3
  c.train.grad_clip = 1.0
  c.train.eval_every = 50
  c.train.log_every = 10
  return c
