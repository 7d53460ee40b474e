"""The `jaxllm` command (jaxllm/cli/commands.py)."""

from jaxllm.cli.commands import main

__all__ = ["main"]
