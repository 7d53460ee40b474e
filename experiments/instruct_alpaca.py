"""The book's ch. 7 run: GPT-2 medium finetuned to follow Alpaca-style instructions.

1,100 records (instruction-data.json), cut without shuffling into the first 85 % for
training (935), the next 10 % for testing (110) and the rest for validation (55); the
Alpaca prompt template, EOS (50256) appended, padding masked out of the loss; batch 8,
AdamW (lr 5e-5, weight decay 0.1), 2 epochs, seed 123. The test responses (greedy, up to
256 new tokens) go to instruction-data-with-response.json; with judge.url set (an
OpenAI-compatible server such as Ollama's, serving e.g. llama3) each is scored 0-100.

    jaxllm convert ... --workdir runs/gpt2-medium     # GPT-2 medium in jaxllm's run layout
    jaxllm finetune --config experiments/instruct_alpaca.py \
        --config.data.path=/path/to/instruction-data.json \
        [--config.judge.url=http://127.0.0.1:11434 --config.judge.model=llama3]
"""

from jaxllm.config import default_config

# The book (ch. 7, GPT-2 medium): validation loss 0.659 after 2 epochs; llama3 (8B) judge
# score 50.32 on the 110 test responses.
EXPECTED = {"val_loss": ("<=", 0.75, "the book, ch. 7: 0.659 after 2 epochs"),
            "judge_score": (">=", 45.0, "the book, ch. 7: llama3 judge 50.32")}


def get_config():
  c = default_config()
  c.train.task = "instruct"
  c.train.init_from = "runs/gpt2-medium"  # GPT-2 medium (355M) from `jaxllm convert`
  c.train.trainable = "all"
  c.model.dropout = 0.0

  c.data.path = ""  # instruction-data.json: give it with --config.data.path=...
  c.instruct.template = "alpaca"
  c.instruct.train_fraction = 0.85
  c.instruct.test_fraction = 0.1
  c.instruct.shuffle = False
  c.instruct.mask_prompt = False
  c.instruct.max_length = 1024  # the book's allowed_max_length
  c.instruct.pad_multiple = 16
  c.instruct.bucket_batches = 20
  c.instruct.max_new_tokens = 256
  c.instruct.generate_batch_size = 16

  c.judge.url = ""  # e.g. http://127.0.0.1:11434 (Ollama) to score the test responses
  c.judge.model = "llama3"

  c.train.epochs = 2
  c.train.batch_size = 8
  c.train.learning_rate = 5e-5
  c.train.schedule = "constant"
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.1
  c.train.beta2 = 0.999  # PyTorch's AdamW defaults, as the book uses them
  c.train.grad_clip = 0.0
  c.train.eval_every = 5
  c.train.eval_batches = 5
  c.train.log_every = 5
  c.train.seed = 123
  return c
