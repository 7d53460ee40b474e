"""The DPO run at CPU size: experiments/dpo_preference.py from the CPU instruction model.

The policy and the reference start from `instruct_alpaca_cpu.py`'s run (2 layers, 64 wide,
trained from scratch), tuned on the same preference pairs, split and template; a small model
far from the book's needs a larger learning rate (1e-4) and two epochs to move. A few
minutes on 2 CPU cores.

    jaxllm finetune --config experiments/instruct_alpaca_cpu.py \
        --config.data.path=/path/to/instruction-data.json
    jaxllm finetune --config experiments/dpo_preference_cpu.py \
        --config.data.path=/path/to/instruction-data-with-preference.json
"""

import pathlib

from jaxllm.config import load_config

# For `jaxllm reproduce --all --cpu`: sized for a 2-core CPU; DATA is the file in the
# data folder that data.path takes; REQUIRES, the experiments whose runs this one
# starts from.
CPU = True
DATA = "instruction-data-with-preference.json"
REQUIRES = ("instruct_alpaca_cpu",)

# jaxllm, 2-core CPU: see docs/finetuning.md for the measured figures.
EXPECTED = {"val_reward_margin": (">", 0.0, "jaxllm, 2-core CPU: 0.130"),
            "val_reward_accuracy": (">", 0.5, "jaxllm, 2-core CPU: 0.600")}


def get_config():
  c = load_config(pathlib.Path(__file__).with_name("dpo_preference.py"))
  c.train.init_from = "runs/instruct_alpaca_cpu"
  c.instruct.max_length = 0  # the context length (128)
  c.instruct.pad_multiple = 32
  c.train.epochs = 2
  c.train.learning_rate = 1e-4
  c.train.eval_every = 25
  c.train.log_every = 5
  return c
