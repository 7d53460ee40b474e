"""Masked-language-model pretraining of a character-level encoder on Tiny Shakespeare.

The encoder side of `shakespeare_char.py`: the same corpus, characters and split (the last
10 % of the text is validation), a 4-layer x 4-head x 128 BERT-style encoder (bert-nano:
post-LayerNorm, exact GELU, full attention over 128 characters) trained with BERT's masking
(15 % of characters selected; of them 80 % [MASK], 10 % a random character, 10 % kept) for
2,000 steps. A few minutes on 2 CPU cores.

    jaxllm train --config experiments/shakespeare_mlm.py --workdir runs/shakespeare_mlm

The figures are the masked characters' loss and accuracy on the validation split; eval.json
sets them beside the unigram baseline (every masked character guessed from the training
split's character frequencies: loss 3.35, accuracy 0.149 on this split).
"""

from jaxllm.config import default_config

# For `jaxllm reproduce --all --cpu`: sized for a 2-core CPU.
CPU = True

# jaxllm, 2-core CPU: see README "Encoders" for the measured figures.
EXPECTED = {
    "val_accuracy": (">=", 0.40, "jaxllm, 2-core CPU: see README (unigram baseline 0.149)"),
    "val_loss": ("<=", 2.2, "jaxllm, 2-core CPU: see README (unigram baseline 3.35)"),
}


def get_config():
  c = default_config()
  c.model.preset = "bert-nano"  # 4 layers, 4 heads, d_model 128, context 128
  c.model.dropout = 0.0

  c.data.dataset = "tiny_shakespeare"
  c.data.train_split = "train+validation+test"
  c.data.separator = ""
  c.data.tokenizer = "char"
  c.data.val_fraction = 0.1
  c.data.sampling = "random"

  c.train.task = "mlm"
  c.train.steps = 2000
  c.train.batch_size = 16
  c.train.learning_rate = 1e-3
  c.train.min_learning_rate = 1e-4
  c.train.warmup_steps = 100
  c.train.beta2 = 0.99
  c.train.weight_decay = 0.01
  c.train.grad_clip = 1.0
  c.train.eval_every = 250
  c.train.eval_batches = 20
  c.train.seed = 1337
  return c
