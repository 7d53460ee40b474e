"""The book's appendix E run: the ch. 6 spam classifier trained through LoRA adapters only.

Every Linear of GPT-2 small (q, k, v, attention out, MLP fc and proj, and the new 2-class
head) gets a rank-16 adapter with alpha 16, and nothing else trains: 2,666,528 trainable
parameters, as the book counts them. AdamW (lr 8e-4, weight decay 0.1), batch 8, 5 epochs;
the data as in ch. 6. The saved run holds the adapters merged into plain weights.

    jaxllm finetune --config experiments/spam_lora.py \
        --config.data.path=/path/to/SMSSpamCollection
"""

import pathlib

from jaxllm.config import load_config

# The book (appendix E, GPT-2 small + LoRA): test accuracy 96.67 %.
EXPECTED = {"trainable_params": ("==", 2_666_528, "the book, appendix E: 2,666,528"),
            "test_accuracy": (">=", 0.95, "the book, appendix E: 96.67 %")}


def get_config():
  c = load_config(pathlib.Path(__file__).with_name("spam_classifier.py"))
  c.train.trainable = "lora"
  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.lora.targets = "qkv,out,fc,proj,head"
  c.train.learning_rate = 8e-4
  return c
