"""jaxllm: GPT-style language models in JAX/Flax."""

from jaxllm.errors import JaxllmError

__version__ = "0.1.0"
__all__ = ["JaxllmError", "__version__"]
