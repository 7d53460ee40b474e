"""Weights in and out: GPT-2 (Hugging Face and OpenAI's TF checkpoints), the Llama family, BERT."""
