#!/usr/bin/env bash
# Sets up jaxllm and runs the main job: nanoGPT's character-level Tiny Shakespeare model,
# 2,000 steps on the CPU, ending with a validation loss and a text sample.
JAXLLM_EXTRAS="" source "$(dirname "$0")/setup.sh"  # jaxllm alone: no test extras
jaxllm train --config experiments/shakespeare_char.py --workdir runs/shakespeare_char "$@"
