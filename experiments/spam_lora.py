"""The book's appendix E run: the ch. 6 spam classifier trained through LoRA adapters only.

Every Linear of GPT-2 small (q, k, v, attention out, MLP fc and proj, and the new 2-class
head) gets a rank-16 adapter with alpha 16, and nothing else trains: 2,666,528 trainable
parameters, as the book counts them. AdamW (lr 8e-4, weight decay 0.1), batch 8, 5 epochs;
the data as in ch. 6. The saved run holds the adapters merged into plain weights.

    jaxllm finetune --config experiments/spam_lora.py \
        --config.data.path=/path/to/SMSSpamCollection
"""

from jaxllm.config import default_config

# The book (appendix E, GPT-2 small + LoRA): test accuracy 96.67 %.
EXPECTED = {"trainable_params": ("==", 2_666_528), "test_accuracy": (">=", 0.95)}


def get_config():
  c = default_config()
  c.train.task = "classify"
  c.train.init_from = "runs/gpt2-small"  # GPT-2 small (124M) from `jaxllm convert`
  c.train.trainable = "lora"
  c.model.dropout = 0.0

  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.lora.targets = "qkv,out,fc,proj,head"

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
  c.train.learning_rate = 8e-4
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
