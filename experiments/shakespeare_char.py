"""nanoGPT's CPU run: a 4-layer character-level GPT on Tiny Shakespeare.

The same model, data split, batches and schedule as nanoGPT's
`config/train_shakespeare_char.py` with its documented CPU overrides (context 64, batch 12,
4 layers x 4 heads x 128, 2,000 steps, lr decay to step 2,000, no dropout).
"""

from jaxllm.config import default_config

# For `jaxllm reproduce --all --cpu`: sized for a 2-core CPU.
CPU = True

# nanoGPT's README gives 1.8857 at step 2,000: one draw of 20 evaluation batches. Measured the
# way this experiment evaluates (200 batches of each split, nanoGPT's default eval_iters) by
# `python benchmarks/shakespeare_seeds.py` on a 2-core AMD EPYC: nanoGPT's recipe 1.9013,
# 1.8883, 1.8871 (seeds 1337, 1, 2; mean 1.8922, std 0.0079), this experiment 1.9061,
# 1.9087, 1.8975 (mean 1.9041, std 0.0059). Expected: nanoGPT's mean + 3 seed stds.
EXPECTED = {"val_loss": ("<=", 1.916, "nanoGPT's recipe, 200 batches, 3 seeds: 1.8922 "
                                      "+ 3 x 0.0079")}


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
  c.train.eval_batches = 200  # nanoGPT's default eval_iters (its CPU run used 20)
  c.train.log_every = 10
  c.train.seed = 1337
  c.train.sample_prompt = "\n"
  c.train.sample_tokens = 60
  return c
