"""The appendix E LoRA classifier at CPU size: adapters on a frozen, randomly initialised GPT.

No pretrained weights exist here, so the frozen backbone is a random 2-layer, 64-wide GPT;
rank-16 adapters (alpha 16) on q, k, v, attention out, MLP fc and proj and the class head
are all that train (AdamW, lr 8e-4 as the book, 5 epochs). It shows the mechanics and what
adapters alone can learn on top of random features; with pretrained weights use
spam_lora.py.

    jaxllm finetune --config experiments/spam_lora_cpu.py \
        --config.data.path=/path/to/SMSSpamCollection
"""

import pathlib

from jaxllm.config import load_config

# For `jaxllm reproduce --all --cpu`: sized for a 2-core CPU; DATA is the file in the
# data folder that data.path takes.
CPU = True
DATA = "SMSSpamCollection"

# jaxllm, 2-core CPU: see docs/finetuning.md for the measured figures.
EXPECTED = {"test_accuracy": (">=", 0.85, "jaxllm, 2-core CPU: 0.877")}


def get_config():
  c = load_config(pathlib.Path(__file__).with_name("spam_lora.py"))
  c.train.init_from = ""  # from scratch: a random frozen backbone
  c.model.n_layer = 2
  c.model.n_head = 2
  c.model.d_model = 64
  c.model.context_length = 128
  c.classifier.max_length = 120
  return c
