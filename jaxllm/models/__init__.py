"""Networks: the GPT decoder, the BERT encoder, their shared layers, heads and LoRA."""
