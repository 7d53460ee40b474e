"""nanoGPT's headline run: GPT-2 small (124M) pretrained on OpenWebText.

nanoGPT's `config/train_gpt2.py`: 8 GPUs x batch 12 x context 1,024 x 5 accumulation steps
per GPU = 480 sequences (491,520 tokens) per optimizer step, AdamW lr 6e-4 (beta2 0.95,
weight decay 0.1, clip 1.0), 2,000 warmup steps, cosine decay to 6e-5 at step 600,000, no
dropout, no biases; nanoGPT reaches a validation loss of about 2.85 (its README), ~4 days on
one 8xA100 node. Not a CPU run.

Data: OpenWebText is not in the TFDS catalog. Give the text as local files (e.g. the
Hugging Face `openwebtext` dataset written out as .txt files, one document per file) and
jaxllm tokenizes them into sharded token files once, streaming, on every core (~9B tokens,
~17 GB of uint16). Validation: the last 0.05 % of the text, by characters (nanoGPT's
`prepare.py` holds out 0.05 % of the documents, drawn at random).

    jaxllm train --config experiments/gpt2_owt.py --config.data.path='/data/owt/*.txt'

Sizing (one process per host; `jaxllm launch` starts them):
- one 8-GPU host: mesh.data=8 (the default below); grad_accum 5 x 8 devices x 12 rows;
- a v5e-16 slice (16 chips, 16 GB HBM each): --config.mesh.data=2 --config.mesh.fsdp=8
  (FSDP splits weights and optimizer state over 8 chips) with the same 480-row batch:
  --config.train.grad_accum=5 gives 96 rows per microbatch, 6 per chip.
`model.remat="dots"` keeps the weight matmuls' outputs and recomputes the rest, which lets
12 rows of 1,024 tokens fit per device with room to spare; bf16 compute with float32
parameters, as nanoGPT's autocast does.
"""

from jaxllm.config import default_config

# nanoGPT README: "GPT-2 (124M) ... gets to ~2.85" validation loss on OpenWebText.
EXPECTED = {"val_loss": ("<=", 2.90, "nanoGPT README: ~2.85 at 600k steps on OpenWebText")}


def get_config():
  c = default_config()
  c.model.preset = "gpt2-small"  # 12 layers, 12 heads, d_model 768, context 1,024
  c.model.bias = False
  c.model.dropout = 0.0
  c.model.dtype = "bfloat16"
  c.model.remat = "dots"

  c.data.dataset = "text"
  c.data.path = ""  # the OpenWebText files: --config.data.path='/data/owt/*.txt'
  c.data.tokenizer = "gpt2"
  c.data.separator = "<|endoftext|>"  # between documents (nanoGPT's prepare.py: after each)
  c.data.val_fraction = 0.0005
  c.data.sampling = "random"

  c.mesh.data = 8

  c.train.steps = 600_000
  c.train.batch_size = 480  # sequences per optimizer step
  c.train.grad_accum = 5
  c.train.learning_rate = 6e-4
  c.train.min_learning_rate = 6e-5
  c.train.warmup_steps = 2000
  c.train.decay_steps = 600_000
  c.train.weight_decay = 0.1
  c.train.beta1 = 0.9
  c.train.beta2 = 0.95
  c.train.grad_clip = 1.0
  c.train.eval_every = 2000
  c.train.eval_batches = 200
  c.train.log_every = 10
  c.train.seed = 1337

  c.checkpoint.every_steps = 2000
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = 1
  return c
