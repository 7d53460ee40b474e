"""The appendix E LoRA classifier at CPU size: adapters on a frozen, randomly initialised GPT.

No pretrained weights exist here, so the frozen backbone is a random 2-layer, 64-wide GPT;
rank-16 adapters (alpha 16) on q, k, v, attention out, MLP fc and proj and the class head
are all that train (AdamW, lr 8e-4 as the book, 5 epochs). It shows the mechanics and what
adapters alone can learn on top of random features; with pretrained weights use
spam_lora.py.

    jaxllm finetune --config experiments/spam_lora_cpu.py \
        --config.data.path=/path/to/SMSSpamCollection
"""

from jaxllm.config import default_config

# jaxllm, 2-core CPU: see README "Finetuning" for the measured figures.
EXPECTED = {"test_accuracy": (">=", 0.85)}


def get_config():
  c = default_config()
  c.train.task = "classify"
  c.train.init_from = ""  # from scratch: a random frozen backbone
  c.train.trainable = "lora"
  c.model.n_layer = 2
  c.model.n_head = 2
  c.model.d_model = 64
  c.model.context_length = 128
  c.model.dropout = 0.0
  c.data.tokenizer = "gpt2"

  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.lora.targets = "qkv,out,fc,proj,head"

  c.data.path = ""  # SMSSpamCollection: give it with --config.data.path=...
  c.classifier.text_column = "1"  # label<TAB>text, no header
  c.classifier.label_column = "0"
  c.classifier.labels = "ham,spam"
  c.classifier.max_length = 120
  c.classifier.pad_id = 50256
  c.classifier.seed = 123

  c.train.epochs = 5
  c.train.batch_size = 8
  c.train.learning_rate = 8e-4
  c.train.schedule = "constant"
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.1
  c.train.beta2 = 0.999
  c.train.grad_clip = 0.0
  c.train.eval_every = 50
  c.train.eval_batches = 5
  c.train.log_every = 10
  c.train.seed = 123
  return c
