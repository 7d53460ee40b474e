"""Text in, token batches out: TFDS builders, tokenization with an on-disk cache, batching."""

from jaxllm.data.batches import (
                                 RandomBatches,
                                 SlidingBatches,
                                 eval_batches,
                                 pad_batch,
                                 sliding_starts,
                                 train_batches,
)
from jaxllm.data.text_builder import JaxllmText, local_builder, resolve_text_files
from jaxllm.data.token_files import TokenShards
from jaxllm.data.tokens import (
                                 TokenData,
                                 dataset_builder,
                                 encode,
                                 load_text,
                                 load_token_data,
                                 tfds_data_dir,
)

__all__ = [
    "JaxllmText", "RandomBatches", "SlidingBatches", "TokenData", "TokenShards", "dataset_builder", "encode",
    "eval_batches", "load_text", "load_token_data", "local_builder", "pad_batch",
    "resolve_text_files", "sliding_starts", "tfds_data_dir", "train_batches",
]
