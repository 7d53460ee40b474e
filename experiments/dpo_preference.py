"""The book's DPO bonus chapter: GPT-2 medium, instruction-tuned, then tuned on preferences.

"Build a Large Language Model (From Scratch)", ch. 7 bonus (04_preference-tuning-with-dpo):
1,100 records with a "chosen" (polite) and a "rejected" (impolite) response, cut as in ch. 7
(935 train / 110 test / 55 validation, no shuffling), the Alpaca prompt template with the
prompt's tokens masked, DPO with beta 0.1 against a frozen copy of the starting model, each
response's log-probability averaged over its tokens; AdamW (lr 5e-6, weight decay 0.01),
batch 8, 1 epoch, seed 123.

    jaxllm finetune --config experiments/instruct_alpaca.py ...   # runs/instruct_alpaca first
    jaxllm finetune --config experiments/dpo_preference.py \
        --config.data.path=/path/to/instruction-data-with-preference.json
"""

import pathlib

from jaxllm.config import load_config

# Not measured by jaxllm (needs GPT-2 medium weights). The book's run ends with the reward
# margin well above 0 on train and validation; what must hold in any case:
EXPECTED = {"val_reward_margin": (">", 0.0, "the book, ch. 7 bonus (DPO): margins rise above 0"),
            "val_reward_accuracy": (">", 0.5, "chosen must win more often than not")}


def get_config():
  # The ch. 7 run's data, split, template and batching; DPO's task, start and optimizer.
  c = load_config(pathlib.Path(__file__).with_name("instruct_alpaca.py"))
  c.train.task = "dpo"
  c.train.init_from = "runs/instruct_alpaca"  # the ch. 7 model: the policy and the reference
  c.dpo.beta = 0.1
  c.dpo.average_logprobs = True  # the book's compute_logprobs averages over the response
  c.data.path = ""  # instruction-data-with-preference.json: --config.data.path=...
  c.train.epochs = 1
  c.train.learning_rate = 5e-6
  c.train.weight_decay = 0.01
  return c
