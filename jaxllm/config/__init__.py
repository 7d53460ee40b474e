"""Run configuration: defaults, model presets, experiment files and command-line overrides.

An experiment is a Python file whose `get_config()` returns an `ml_collections.ConfigDict`,
usually `default_config()` with a few keys changed. Any key can be overridden from the
command line as `--config.<section>.<key>=<value>`; a key that does not exist is an error.
"""

from jaxllm.config.defaults import DEFAULT_PRESET, PRESETS, default_config
from jaxllm.config.files import (
    ESCAPED_KEYS,
    RENAMED,
    RUNTIME_KEYS,
    apply_overrides,
    check_keys,
    check_read_back_overrides,
    check_train,
    every,
    from_dict,
    load_config,
    load_experiment,
    to_dict,
)
from jaxllm.config.model import (
    ARCHITECTURES,
    EncoderConfig,
    ModelConfig,
    architecture,
    architecture_of,
    encoder_config,
    model_config,
    resolve,
)

__all__ = ["ARCHITECTURES", "DEFAULT_PRESET", "ESCAPED_KEYS", "EncoderConfig", "ModelConfig", "PRESETS", "RENAMED", "RUNTIME_KEYS", "apply_overrides", "architecture", "architecture_of", "check_keys", "check_read_back_overrides", "check_train", "default_config", "encoder_config", "every", "from_dict", "load_config", "load_experiment", "model_config", "resolve", "to_dict"]
