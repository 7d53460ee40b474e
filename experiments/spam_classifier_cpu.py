"""The ch. 6 spam classifier at CPU size, from scratch: no pretrained weights needed.

The book's data and recipe (balanced 747 + 747, split 70/10/20 with seed 123, gpt2 tokens
padded with 50256, here to a fixed 120 tokens, batch 8), but a 2-layer, 64-wide GPT trained
from random initialisation, all of it, with AdamW (lr 1e-3, cosine decay) for 3 epochs. A few minutes on
2 CPU cores.

    jaxllm finetune --config experiments/spam_classifier_cpu.py \
        --config.data.path=/path/to/SMSSpamCollection
"""

from jaxllm.config import default_config

# jaxllm, 2-core CPU: see README "Finetuning" for the measured figures.
EXPECTED = {"test_accuracy": (">=", 0.95)}


def get_config():
  c = default_config()
  c.train.task = "classify"
  c.train.init_from = ""  # from scratch
  c.train.trainable = "all"
  c.model.n_layer = 2
  c.model.n_head = 2
  c.model.d_model = 64
  c.model.context_length = 128
  c.model.dropout = 0.0
  c.data.tokenizer = "gpt2"

  c.data.path = ""  # SMSSpamCollection: give it with --config.data.path=...
  c.classifier.text_column = "1"  # label<TAB>text, no header
  c.classifier.label_column = "0"
  c.classifier.labels = "ham,spam"
  c.classifier.max_length = 120  # the book's padded length
  c.classifier.pad_id = 50256
  c.classifier.seed = 123

  c.train.epochs = 3
  c.train.batch_size = 8
  c.train.learning_rate = 1e-3
  c.train.min_learning_rate = 1e-5
  c.train.schedule = "cosine"  # decaying to 1e-5 settles the last steps (constant: val 94.6 %)
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.1
  c.train.beta2 = 0.999
  c.train.grad_clip = 1.0
  c.train.eval_every = 50
  c.train.eval_batches = 5
  c.train.log_every = 10
  c.train.seed = 123
  return c
