"""Every key jaxllm knows, with its default (`default_config`), and the model presets."""

from __future__ import annotations

from typing import Any

import ml_collections

# Llama-family architecture: RMSNorm, rotary positions, SwiGLU, no biases, untied by default.
_LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=False)

# name -> model keys. Sizes (n_layer, n_head, d_model, context_length) always; the others
# where they differ from GPT-2's defaults. vocab_size, where given, is the model's own; a
# tokenizer's vocabulary takes its place when the model is built from one.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, context_length=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024, context_length=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280, context_length=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, d_model=1600, context_length=1024),
    # CPU-sized models. gpt-nano is nanoGPT's CPU Shakespeare model.
    "gpt-nano": dict(n_layer=4, n_head=4, d_model=128, context_length=64),
    "gpt-micro": dict(n_layer=2, n_head=2, d_model=64, context_length=32),
    # gpt-nano's sizes with Llama's components and 2 kv heads (grouped-query attention).
    "llama-nano": dict(n_layer=4, n_head=4, d_model=128, context_length=64, n_kv_head=2,
                       mlp_hidden=352, **_LLAMA),
    # Open models, with the shapes of their Hugging Face config.json.
    "smollm2-135m": dict(n_layer=30, n_head=9, n_kv_head=3, d_model=576, mlp_hidden=1536,
                         context_length=8192, vocab_size=49152, rope_theta=100000.0,
                         **{**_LLAMA, "tie_embeddings": True}),
    "qwen2.5-0.5b": dict(n_layer=24, n_head=14, n_kv_head=2, d_model=896, mlp_hidden=4864,
                         context_length=32768, vocab_size=151936, rope_theta=1000000.0,
                         layer_norm_epsilon=1e-6, qkv_bias=True,
                         **{**_LLAMA, "tie_embeddings": True}),
    "llama-3.2-1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, mlp_hidden=8192,
                         context_length=131072, vocab_size=128256, rope_theta=500000.0,
                         rope_scaling_factor=32.0, rope_low_freq_factor=1.0,
                         rope_high_freq_factor=4.0, rope_original_context=8192,
                         **{**_LLAMA, "tie_embeddings": True}),
    # Encoders (model.architecture=bert, jaxllm/models/bert.py). bert-nano: gpt-nano's sizes with
    # a longer context; bert-base: Devlin et al.'s 110M model with its WordPiece vocabulary.
    "bert-nano": dict(architecture="bert", n_layer=4, n_head=4, d_model=128,
                      context_length=128),
    "bert-base": dict(architecture="bert", n_layer=12, n_head=12, d_model=768,
                      context_length=512, vocab_size=30522, layer_norm_epsilon=1e-12),
}
# The architecture used when neither a preset nor explicit sizes are given.
DEFAULT_PRESET = "gpt-nano"


def default_config() -> ml_collections.ConfigDict:
  """Every key jaxllm knows, with its default. Experiments start from this."""
  c = ml_collections.ConfigDict()
  c.model = _model()
  c.data = _data()
  c.train = _train()
  c.checkpoint = _checkpoint()
  c.mesh = _mesh()
  c.lora = _lora()
  c.classifier = _classifier()
  c.instruct = _instruct()
  c.dpo = _dpo()
  c.judge = _judge()
  return c


def _model() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()

  s.preset = ""  # a key of PRESETS; explicit sizes below override it
  # "gpt" (a causal decoder, jaxllm/models/gpt.py) or "bert" (a bidirectional encoder,
  # jaxllm/models/bert.py: tasks mlm and classify). None: the preset's, else gpt.
  s.architecture = None
  s.n_layer = None  # transformer blocks (None: the preset's)
  s.n_head = None  # attention heads
  s.d_model = None  # width of the residual stream
  s.context_length = None  # the longest sequence, in tokens
  s.vocab_size = None  # None: the tokenizer's vocabulary size
  s.dropout = 0.0  # in training: on the embeddings and on each sublayer's output
  # Architecture. None: the preset's value, else GPT-2's (given after the colon).
  s.bias = None  # biases in every Linear and LayerNorm: True
  s.qkv_bias = None  # biases of the q/k/v projections: same as bias
  s.tie_embeddings = None  # output projection = token embedding transposed: True
  s.norm = None  # "layernorm" or "rmsnorm": layernorm
  s.layer_norm_epsilon = None  # the norms' epsilon: 1e-5
  s.position = None  # "learned" (absolute embeddings) or "rope" (rotary): learned
  s.rope_theta = None  # rotary base: 10000.0
  # Llama 3's rotary frequency scaling; factor 0 = none: 0.0, 1.0, 4.0, 8192
  s.rope_scaling_factor = None
  s.rope_low_freq_factor = None  # Llama 3 scaling: low-frequency factor
  s.rope_high_freq_factor = None  # Llama 3 scaling: high-frequency factor
  s.rope_original_context = None  # Llama 3 scaling: the context it was trained for
  # "gelu" (GPT-2's tanh approximation), "swiglu" or "relu2" (relu(x)^2, the speedrun's): gelu
  s.mlp = None
  s.mlp_hidden = None  # MLP hidden units: 4 * d_model (gelu); required for swiglu
  s.n_kv_head = None  # key/value heads (grouped-query attention; 1 = multi-query): n_head
  s.qk_norm = None  # RMSNorm over each head of q and k before attention (Qwen3): False
  # The GPT-2 speedrun's keys, off by default (Hugging Face export refuses the last three).
  s.zero_init_proj = False  # zero init of attention out, MLP proj, and the head if untied
  s.logit_softcap = 0.0  # logits = C * tanh(logits / C) wherever they come out; 0 = off
  s.x0_shortcut = False  # block input x -> l * x + m * x0 (embeddings); learned l=1, m=0 at init
  s.value_residual = False  # values v -> a * v + b * layer 0's v; learned a=1, b=0 at init
  # Encoders only. Segment (token-type) embeddings: 2; LayerNorm before each sublayer, with a
  # final one (GPT-2's order), instead of BERT's after each residual sum: False.
  s.type_vocab_size = None
  s.pre_norm = None  # encoders only: pre-LayerNorm blocks (see type_vocab_size)
  # Compute dtype; parameters are float32 (bfloat16 computes on float32 parameters).
  # "float64" (parameters, optimizer state and all arithmetic; needs JAX_ENABLE_X64=1) is for
  # numerical checks: on every mesh its losses agree to ~1e-12 where float32's rounding,
  # summed in another order, can grow over hundreds of steps.
  s.dtype = "float32"
  # "bfloat16": every weight matmul takes bf16 operands and accumulates and returns float32,
  # forward and backward (jaxllm/models/matmul.py); the rest stays float32. 1.33x at GPT-2 small's
  # shapes on a CPU with bf16 dot instructions; losses within ~2e-3 of float32's.
  s.matmul_dtype = "float32"
  # Std of the token and position embeddings at init: GPT-2's 0.02, or 1.0 for PyTorch's
  # nn.Embedding default (what "Build a Large Language Model (From Scratch)" trains with).
  s.embedding_init_std = 0.02
  # Recompute each block's activations in the backward pass: "none", "full" (keep only the
  # block's input) or "dots" (keep the weight matmuls' outputs); less memory, more FLOPs.
  s.remat = "none"
  s.scan_layers = False  # stack the blocks under one nn.scan (params: "blocks", LxDx...)
  return s


def _data() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.dataset = "tiny_shakespeare"  # a TFDS catalog name, or "text" for local files
  # The corpus of every task. lm with dataset="text": a file, a directory of .txt files or a
  # glob; classify: labelled texts (SMSSpamCollection, .csv/.tsv with a header, .jsonl);
  # instruct: Alpaca records (.json list or .jsonl); dpo: the same with chosen/rejected.
  s.path = ""
  s.data_dir = ""  # TFDS data dir; "" = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  s.tokenizer = "gpt2"  # any tiktoken encoding name, or "char"
  s.train_split = "train"  # TFDS splits, joined with "+"
  s.val_split = ""  # "": carve val_fraction off the end of the training text
  s.val_fraction = 0.1  # the end fraction of the text kept for validation
  s.separator = "<|endoftext|>"  # put between documents; "" joins them as they are
  s.sampling = "random"  # "random" offsets (nanoGPT) or "sliding" windows (the book)
  s.stride = 0  # sliding-window stride; 0 = context_length
  s.tokenize_workers = 0  # threads tokenizing a corpus into the cache; 0 = every core
  s.prefetch = 2  # training batches made and placed on the devices ahead; 0 = none
  return s


def _train() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.steps = 1000  # optimizer steps
  s.epochs = 0  # > 0: train this many passes over the sliding windows instead
  s.batch_size = 12  # sequences per optimizer step (all microbatches together)
  s.learning_rate = 1e-3  # peak learning rate (after warmup)
  s.min_learning_rate = 1e-4  # end of the cosine or wsd decay
  # "cosine" (linear warmup + cosine decay), "constant", or "wsd" (warmup, stable, decay:
  # linear warmup, the peak rate, then a decay over the last decay_fraction of the steps).
  s.schedule = "cosine"
  s.warmup_steps = 100  # linear warmup from 0
  s.decay_steps = 0  # 0 = steps
  s.decay_fraction = 0.2  # wsd: the end fraction of the steps that decays, in (0, 1]
  s.decay_shape = "linear"  # wsd's decay: "linear" or "1-sqrt" (Hägele et al. 2024)
  # "adamw", or "muon": Muon (orthogonalised momentum; jaxllm/training/muon.py) for the
  # blocks' hidden matrices, AdamW (learning_rate, beta1, beta2, weight_decay) for the rest.
  s.optimizer = "adamw"
  # Muon's peak rate (the speedrun's): Muon's rate is train.schedule's times
  # muon_learning_rate / learning_rate, at every step.
  s.muon_learning_rate = 0.02
  s.muon_momentum = 0.95  # Muon's (Nesterov) momentum after its warmup
  s.muon_momentum_start = 0.85  # Muon's momentum at step 0, rising linearly to muon_momentum
  s.muon_momentum_warmup_steps = 300  # steps of that rise (the speedrun's); 0 = no warmup
  s.muon_ns_steps = 5  # Newton-Schulz iterations per Muon update
  s.muon_weight_decay = 0.0  # Muon's decoupled weight decay, times Muon's learning rate
  s.weight_decay = 0.1  # applied to matrices (ndim >= 2) only
  s.beta1 = 0.9  # AdamW's first-moment decay
  s.beta2 = 0.95  # AdamW's second-moment decay
  s.grad_clip = 1.0  # global-norm clipping; 0 disables it
  s.grad_accum = 1  # microbatches per optimizer step
  s.eval_every = 250  # also evaluated before the first step and after the last; 0 = only then
  s.eval_batches = 20  # batches of each split per evaluation
  # > 0: the first evaluation with val_loss <= this: its step, tokens and training seconds in
  # metrics.jsonl (target_step, ...), eval.json (steps_to_target, ...) and the printout; 0 = off
  s.target_val_loss = 0.0
  s.log_every = 10  # 0 = log only where the run evaluates
  s.seed = 1337  # parameters, batches and dropout follow from it
  s.peak_flops = 0.0  # per-device FLOP/s for MFU; 0 = measure a matmul at start-up
  s.sample_prompt = "\n"  # the text sample's prompt (backslash escapes allowed)
  s.sample_tokens = 200  # the text sample at the end of pretraining; 0 = none
  # What the trainer optimises (jaxllm/tasks/): "lm" (next-token pretraining), "mlm" (an
  # encoder's masked-token pretraining), "classify", "instruct" (Alpaca-style instruction
  # tuning) or "dpo" (preference tuning).
  s.task = "lm"
  # A run directory (of `jaxllm train`, or made by `jaxllm convert` from GPT-2 weights) whose
  # parameters start this run; its config.json gives the architecture and its tokenizer.json
  # the tokenizer. "" = random init from `model`.
  s.init_from = ""
  # What trains, comma-separated: all, backbone, head, last_block, final_norm, embeddings, lora,
  # or a regex on parameter paths ("backbone/blocks_11/attn"). The book's ch. 6:
  # "head,last_block,final_norm".
  s.trainable = "all"
  return s


def _checkpoint() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.every_steps = 250  # save the train state every this many steps; 0 = only at the end
  s.keep = 3  # how many of the latest checkpoints to keep; 0 = all
  s.keep_best = 0  # also keep this many with the lowest val_loss (saved at eval steps)
  s["async"] = True  # write in a background thread while training goes on
  s.resume = True  # a --workdir holding checkpoints resumes from the latest
  return s


def _mesh() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  # Devices as a (data, fsdp, tensor) grid; one size may be -1 (= the remaining devices).
  s.data = 1  # data parallel: batch rows split, weights replicated
  s.fsdp = 1  # batch rows split and weights + optimizer state split (FSDP / ZeRO-3)
  s.tensor = 1  # heads, MLP units and vocabulary split (Megatron tensor parallel)
  # (logical axis, mesh axis or axes or None) pairs replacing those axes' rules in
  # jaxllm.training.sharding.DEFAULT_RULES, e.g. --config.mesh.rules="[('vocab', None)]".
  s.rules = ()
  return s


def _lora() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.rank = 0  # 0 = no LoRA; > 0 adds rank-r adapters (train them with trainable="lora")
  s.alpha = 16.0  # adapters are scaled by alpha / rank
  # Kernels to adapt (attention and MLP, by GPT-2's and Llama's module names: what a model
  # lacks is skipped); add "head" for the class head (appendix E).
  s.targets = "qkv,q,kv,out,fc,gate,up,proj"
  return s


def _classifier() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.format = "auto"  # auto (.csv, .jsonl, else tsv), tsv, csv or jsonl
  s.text_column = "text"  # header name / JSON key, or a 0-based index (no header)
  s.label_column = "label"  # header name / JSON key of the label, or a 0-based index
  s.labels = ""  # class names in class-id order, "ham,spam"; "" = sorted distinct labels
  s.balance = True  # downsample every class to the rarest class's count
  s.train_fraction = 0.7  # of the (balanced) texts, in file order
  s.val_fraction = 0.1  # test = the rest
  s.max_length = 0  # pad/truncate to this many tokens; 0 = longest training text
  s.pad_id = -1  # -1 = the tokenizer's: [PAD], else <|endoftext|> (50256 for gpt2)
  s.seed = 123  # balancing and splitting (the book's random_state)
  # The hidden state the head reads: "last" real token (a decoder's: its causal attention has
  # seen the whole text), "cls" (an encoder's first token through its pooler, as BERT) or
  # "mean" over the real tokens. "" = last for GPT, cls for encoders.
  s.pooling = ""
  return s


def _instruct() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.template = "alpaca"  # prompt template: alpaca (the book's) or phi3
  s.train_fraction = 0.85  # the book's order: train, then test, then validation
  s.test_fraction = 0.1  # after train, before validation
  s.shuffle = False  # shuffle records (with train.seed) before splitting
  s.mask_prompt = False  # no loss on the prompt's tokens, only on the response
  s.max_length = 0  # truncate examples to this many tokens; 0 = context length
  s.pad_multiple = 16  # pad batches to a multiple of this: fewer shapes to compile
  s.bucket_batches = 20  # sort pools of this many batches by length; 0 = plain shuffle
  s.max_new_tokens = 256  # response length when generating for the test split
  s.generate_batch_size = 16  # prompts per batch when generating test responses
  return s


def _dpo() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  # train.task=dpo (Rafailov et al. 2023, as the book's bonus chapter): data.path holds Alpaca
  # records with "chosen" and "rejected" responses; prompt, split and batching as `instruct`,
  # the prompt's tokens always masked; the reference model is train.init_from, frozen.
  s.beta = 0.1  # how far the policy may move from the reference
  # Each response's log-probability as the mean over its tokens (the book), or the sum (the
  # paper).
  s.average_logprobs = True
  return s


def _judge() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.url = ""  # OpenAI-compatible server scoring test responses (Ollama, vLLM); "" = off
  s.model = "llama3"  # the judge model's name on that server
  s.timeout = 120.0  # seconds per request
  return s


