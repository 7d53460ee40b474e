"""nanoGPT's CPU run: a 4-layer character-level GPT on Tiny Shakespeare.

The same model, data split, batches and schedule as nanoGPT's
`config/train_shakespeare_char.py` with its documented CPU overrides (context 64, batch 12,
4 layers x 4 heads x 128, 2,000 steps, lr decay to step 2,000, no dropout).
"""

from jaxllm.config import default_config

# For `jaxllm reproduce --all --cpu`: sized for a 2-core CPU.
CPU = True

# nanoGPT (PyTorch, 2-core CPU): validation loss 1.8857 at step 2,000, in 104 s.
EXPECTED = {"val_loss": ("<=", 1.88, "nanoGPT README, CPU run: 1.8857 at step 2,000")}


def get_config():
  c = default_config()
  c.model.preset = "gpt-nano"  # 4 layers, 4 heads, d_model 128, context 64
  c.model.bias = False  # nanoGPT's default
  c.model.dropout = 0.0

  c.data.dataset = "tiny_shakespeare"
  # TFDS cuts the text into train/validation/test; joined back they are the whole file, and
  # the last 10 % of its characters is nanoGPT's validation set.
  c.data.train_split = "train+validation+test"
  c.data.separator = ""
  c.data.tokenizer = "char"
  c.data.val_fraction = 0.1
  c.data.sampling = "random"

  c.train.steps = 2000
  c.train.batch_size = 12
  c.train.learning_rate = 1e-3
  c.train.min_learning_rate = 1e-4
  c.train.warmup_steps = 100
  c.train.decay_steps = 2000
  c.train.beta2 = 0.99
  c.train.weight_decay = 0.1
  c.train.grad_clip = 1.0
  c.train.eval_every = 250
  c.train.eval_batches = 20
  c.train.log_every = 10
  c.train.seed = 1337
  c.train.sample_prompt = "\n"
  c.train.sample_tokens = 60
  return c
