"""The PyTorch side of benchmarks/vs_pytorch.py: nanoGPT's GPT and its training loop, written
for speed on a CPU the way a PyTorch user would.

The model is nanoGPT's (`model.py`): one fused qkv Linear, `scaled_dot_product_attention`,
GELU (the tanh approximation, as GPT-2 and jaxllm), pre-LayerNorm blocks, the output layer
tied to the token embedding. Training is nanoGPT's `train.py` step: AdamW (`fused=True`,
decay on matrices only), global-norm clipping, cosine learning rate with warmup, optional
bf16 autocast and `torch.compile`. `shakespeare` replays nanoGPT's documented CPU run on
Tiny Shakespeare (`--device=cpu --compile=False --eval_iters=20 --log_interval=1
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`): random windows from the first 90 % of the characters,
losses of 20 batches of both splits every 250 steps, a checkpoint when validation improves.

Library code, not a script: vs_pytorch.py runs each function in a process of its own.
"""

from __future__ import annotations

import math
import os
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):

  def __init__(self, d_model: int, n_head: int, bias: bool):
    super().__init__()
    self.n_head = n_head
    self.ln_1 = nn.LayerNorm(d_model, bias=bias)
    self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
    self.attn_proj = nn.Linear(d_model, d_model, bias=bias)
    self.ln_2 = nn.LayerNorm(d_model, bias=bias)
    self.c_fc = nn.Linear(d_model, 4 * d_model, bias=bias)
    self.mlp_proj = nn.Linear(4 * d_model, d_model, bias=bias)

  def forward(self, x_BxLxD):
    b, length, d = x_BxLxD.shape
    qkv = self.c_attn(self.ln_1(x_BxLxD))
    q, k, v = (t.view(b, length, self.n_head, d // self.n_head).transpose(1, 2)
               for t in qkv.split(d, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x_BxLxD = x_BxLxD + self.attn_proj(y.transpose(1, 2).contiguous().view(b, length, d))
    return x_BxLxD + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x_BxLxD)), approximate="tanh"))


class GPT(nn.Module):

  def __init__(self, vocab_size: int, context_length: int, n_layer: int, n_head: int,
               d_model: int, bias: bool = True):
    super().__init__()
    self.wte = nn.Embedding(vocab_size, d_model)
    self.wpe = nn.Embedding(context_length, d_model)
    self.blocks = nn.ModuleList(Block(d_model, n_head, bias) for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(d_model, bias=bias)
    self.apply(self._init)
    for name, p in self.named_parameters():  # GPT-2's scaled residual projections
      if name.endswith("proj.weight"):
        nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

  @staticmethod
  def _init(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
      nn.init.zeros_(module.bias)

  def forward(self, tokens_BxL, targets_BxL=None):
    positions = torch.arange(tokens_BxL.shape[1])
    x = self.wte(tokens_BxL) + self.wpe(positions)
    for block in self.blocks:
      x = block(x)
    logits_BxLxV = F.linear(self.ln_f(x), self.wte.weight)  # tied
    if targets_BxL is None:
      return logits_BxLxV
    return F.cross_entropy(logits_BxLxV.float().flatten(0, 1), targets_BxL.flatten())


def optimizer(model: GPT, learning_rate: float, weight_decay: float, betas) -> torch.optim.AdamW:
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=learning_rate, betas=betas, fused=True)


def make_step(model: GPT, opt: torch.optim.Optimizer, *, bf16: bool, compile_: bool,
              grad_clip: float = 1.0):
  forward = torch.compile(model) if compile_ else model

  def step(inputs, targets):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = forward(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  return step


def time_train_steps(shape: dict, steps: int, warmup: int, bf16: bool, compile_: bool) -> dict:
  """Median seconds per train step on random tokens, after `warmup` steps."""
  torch.manual_seed(0)
  model = GPT(shape["vocab_size"], shape["context_length"], shape["n_layer"], shape["n_head"],
              shape["d_model"], shape["bias"])
  step = make_step(model, optimizer(model, 6e-4, 0.1, (0.9, 0.95)), bf16=bf16,
                   compile_=compile_)
  tokens = torch.randint(0, shape["vocab_size"],
                         (shape["batch_size"], shape["context_length"] + 1))
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    loss = step(tokens[:, :-1], tokens[:, 1:]).item()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return {"seconds_per_step": float(np.median(times)), "last_loss": loss}


@torch.no_grad()
def time_hf_generate(prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
  """transformers' GPT2LMHeadModel (GPT-2 small, random weights) greedy `generate` with its
  KV cache, batch 1: new tokens per second, the median of `repeats` after a warm-up."""
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config()).eval()
  prompt = torch.randint(0, 50257, (1, prompt_tokens))
  kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(prompt))
  model.generate(prompt, **kwargs)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    times.append(time.perf_counter() - start)
  assert out.shape[1] == prompt_tokens + new_tokens
  return {"tokens_per_s": new_tokens / float(np.median(times))}


def shakespeare(text_path: str, workdir: str, iters: int = 2000, seed: int = 1337,
                eval_batches: int = 20) -> dict:
  """nanoGPT's CPU Shakespeare run (see the module docstring; `eval_batches` is its
  eval_iters, `seed` its 1337); wall time from the start of this function, which includes
  nanoGPT's data preparation (a second or so)."""
  start = time.perf_counter()
  text = pathlib.Path(text_path).read_text()
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  ids = np.array([index[c] for c in text], np.uint16)
  split = int(0.9 * len(ids))
  data = {"train": ids[:split], "val": ids[split:]}
  batch_size, block = 12, 64
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)

  def get_batch(name):
    tokens = data[name]
    starts = rng.integers(0, len(tokens) - block, batch_size)
    x = torch.from_numpy(np.stack([tokens[i:i + block] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([tokens[i + 1:i + 1 + block] for i in starts]).astype(np.int64))
    return x, y

  model = GPT(len(chars), block, 4, 4, 128, bias=False)
  opt = optimizer(model, 1e-3, 0.1, (0.9, 0.99))
  step = make_step(model, opt, bf16=False, compile_=False)

  def learning_rate(it):  # nanoGPT's get_lr: linear warmup, cosine to min_lr
    if it < 100:
      return 1e-3 * (it + 1) / 101
    ratio = min(1.0, (it - 100) / (iters - 100))
    return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

  @torch.no_grad()
  def estimate_loss():
    model.eval()
    out = {name: float(np.mean([model(*get_batch(name)).item() for _ in range(eval_batches)]))
           for name in data}
    model.train()
    return out

  best, losses = float("inf"), {}
  for it in range(iters + 1):
    for group in opt.param_groups:
      group["lr"] = learning_rate(it)
    if it % 250 == 0:
      losses = estimate_loss()
      if losses["val"] < best and it > 0:
        best = losses["val"]
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()},
                   os.path.join(workdir, "ckpt.pt"))
    if it == iters:
      break
    step(*get_batch("train")).item()  # log_interval=1: the loss reaches the host each step
  return {"wall_s": time.perf_counter() - start, "val_loss": losses["val"]}
