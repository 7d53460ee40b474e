"""The book's chapter 5 run: GPT-2 small trained from scratch on "The Verdict".

"Build a Large Language Model (From Scratch)", ch. 5: context 256, a 90/10 split by
characters, sliding windows of stride 256, batch 2, AdamW (lr 4e-4, weight decay 0.1),
dropout 0.1, no qkv bias, 10 epochs, seed 123. 5,145 tokens are far too few for 124M
parameters: the model memorises the training text and the validation loss stays high.

    jaxllm train --config experiments/verdict_gpt2.py --config.data.path=the-verdict.txt
"""

from jaxllm.config import default_config

# For `jaxllm reproduce --all --cpu`: sized for a 2-core CPU; DATA is the file in the
# data folder that data.path takes.
CPU = True
DATA = "the-verdict.txt"

# The book: 10.99 untrained; after 10 epochs train 0.39, validation 6.45.
EXPECTED = {"initial_val_loss": ("between", 10.7, 11.1, "the book, ch. 5: 10.99 untrained"),
            "train_loss": ("<", 1.0, "the book, ch. 5: 0.39 after 10 epochs"),
            "val_loss": (">", 5.0, "the book, ch. 5: 6.45 (memorised, not learned)")}


def get_config():
  c = default_config()
  c.model.preset = "gpt2-small"
  c.model.context_length = 256
  c.model.dropout = 0.1
  c.model.qkv_bias = False
  # The book's GPTModel: a separate output head (163M parameters at context 1,024) and
  # PyTorch's default init, under which embeddings are N(0, 1), not GPT-2's N(0, 0.02).
  c.model.tie_embeddings = False
  c.model.embedding_init_std = 1.0

  c.data.dataset = "text"
  c.data.path = ""  # the-verdict.txt: give it with --config.data.path=...
  c.data.tokenizer = "gpt2"
  c.data.val_fraction = 0.1
  c.data.sampling = "sliding"
  c.data.stride = 256

  c.train.epochs = 10
  c.train.batch_size = 2
  c.train.learning_rate = 4e-4
  c.train.schedule = "constant"
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.1
  c.train.beta2 = 0.999
  c.train.grad_clip = 0.0
  c.train.eval_every = 5
  c.train.eval_batches = 5
  c.train.log_every = 1
  c.train.seed = 123
  c.train.sample_prompt = "Every effort moves you"
  c.train.sample_tokens = 50
  return c
