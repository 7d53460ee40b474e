"""nanoGPT's CPU Shakespeare run with Llama's components in place of GPT-2's.

The same data, batches, steps, schedule and sizes as experiments/shakespeare_char.py (4
layers, 4 heads, d_model 128, context 64, 2,000 steps), with rotary positions instead of
learned ones, RMSNorm instead of LayerNorm, a SwiGLU MLP of 352 hidden units instead of a
GELU MLP of 512 (about the same parameters), grouped-query attention with 2 kv heads for 4
query heads, and no biases: the `llama-nano` preset.

    jaxllm train --config experiments/shakespeare_char_llama.py
"""

import pathlib

from jaxllm.config import load_config

# For `jaxllm reproduce --all --cpu`: sized for a 2-core CPU.
CPU = True

# jaxllm, 2-core CPU: validation loss 1.7043 at step 2,000 (train 1.5291), 18.5 steps/s;
# GPT-2's components on the same budget (shakespeare_char.py): 1.9058.
EXPECTED = {"val_loss": ("<=", 1.75, "jaxllm, 2-core CPU: 1.7043 (GPT-2's components: 1.9058)")}


def get_config():
  c = load_config(pathlib.Path(__file__).with_name("shakespeare_char.py"))
  c.model.preset = "llama-nano"
  c.model.bias = None  # the preset's: none
  c.train.eval_batches = 20  # as its figure below was measured
  return c
