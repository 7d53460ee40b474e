"""nanoGPT's CPU budget with the modern recipe: the GPT-2 speedrun's ingredients at CPU size.

The data, batches, model size (4 layers x 4 heads x 128, context 64, 2,000 steps of 12
sequences) and evaluation (200 batches) of `shakespeare_char.py`, trained with what the GPT-2
speedrun (modded-nanogpt) changed: Muon for the hidden matrices (AdamW for embeddings, head,
norms), a warmup-stable-decay schedule, RoPE, RMSNorm and QK-norm, ReLU² MLPs, an untied head,
zero-initialised output projections and head, logit soft-capping, and the x0 / value
residual shortcuts with learned per-layer weights. `train.target_val_loss` is the nanoGPT
recipe's own 2,000-step figure (jaxllm, 200 batches, seeds 1337-1339: mean 1.9041), so
eval.json says when this run got there (steps_to_target, tokens_to_target,
seconds_to_target). Each ingredient is a key; `--config.KEY=...` takes one out (the ablation
table of docs/training.md).

    jaxllm reproduce experiments/shakespeare_speedrun.py --seeds 1337,1338,1339
"""

import pathlib

from jaxllm.config import load_config

CPU = True

EXPECTED = {
    "val_loss": ("<=", 1.67, "issue goal at 2,000 steps (nanoGPT recipe 1.906)"),
    "steps_to_target": ("<=", 1000, "<= 50% of the nanoGPT recipe's 2,000 steps"),
}


def get_config():
  c = load_config(pathlib.Path(__file__).with_name("shakespeare_char.py"))
  c.model.norm = "rmsnorm"
  c.model.position = "rope"
  c.model.qk_norm = True
  c.model.mlp = "relu2"
  c.model.tie_embeddings = False
  c.model.zero_init_proj = True
  c.model.logit_softcap = 30.0
  c.model.x0_shortcut = True
  c.model.value_residual = True

  c.train.optimizer = "muon"
  c.train.schedule = "wsd"
  c.train.decay_fraction = 0.4
  c.train.eval_every = 100
  c.train.target_val_loss = 1.9041
  return c
