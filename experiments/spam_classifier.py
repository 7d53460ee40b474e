"""The book's ch. 6 run: GPT-2 small finetuned as an SMS spam classifier.

"Build a Large Language Model (From Scratch)", ch. 6: the UCI SMS Spam Collection balanced
to 747 ham (drawn with seed 123) + 747 spam, split 70/10/20 with seed 123, GPT-2 tokens
padded with 50256 to the longest training text (120 in the book), batch 8, AdamW (lr 5e-5,
weight decay 0.1), 5 epochs; only the last transformer block, the final LayerNorm and a new
2-class head train. jaxllm's head reads the last real token, where the book reads the last
position (a padding token in all but the longest texts).

    jaxllm convert ... --workdir runs/gpt2-small      # GPT-2 small in jaxllm's run layout
    jaxllm finetune --config experiments/spam_classifier.py \
        --config.data.path=/path/to/SMSSpamCollection
"""

from jaxllm.config import default_config

# The book (ch. 6, GPT-2 small): train 97.21 %, validation 97.32 %, test 95.67 %.
EXPECTED = {"train_accuracy": (">=", 0.95, "the book, ch. 6: 97.21 %"),
            "val_accuracy": (">=", 0.95, "the book, ch. 6: 97.32 %"),
            "test_accuracy": (">=", 0.94, "the book, ch. 6: 95.67 %")}


def get_config():
  c = default_config()
  c.train.task = "classify"
  c.train.init_from = "runs/gpt2-small"  # GPT-2 small (124M) from `jaxllm convert`
  c.train.trainable = "head,last_block,final_norm"
  c.model.dropout = 0.0

  c.data.path = ""  # SMSSpamCollection: give it with --config.data.path=...
  c.classifier.text_column = "1"  # label<TAB>text, no header
  c.classifier.label_column = "0"
  c.classifier.labels = "ham,spam"
  c.classifier.balance = True
  c.classifier.train_fraction = 0.7
  c.classifier.val_fraction = 0.1
  c.classifier.max_length = 0  # the longest training text
  c.classifier.pad_id = 50256
  c.classifier.seed = 123

  c.train.epochs = 5
  c.train.batch_size = 8
  c.train.learning_rate = 5e-5
  c.train.schedule = "constant"
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.1
  c.train.beta2 = 0.999  # PyTorch's AdamW defaults, as the book uses them
  c.train.grad_clip = 0.0
  c.train.eval_every = 50
  c.train.eval_batches = 5
  c.train.log_every = 10
  c.train.seed = 123
  return c
