"""Chat templates: a conversation (a list of {"role", "content"} messages) as the prompt text a
model continues with the assistant's reply, for /v1/chat/completions.

`chat_template_for(workdir, config)` picks one of three:
  - a converted Hugging Face model whose run directory keeps its tokenizer_config.json: the
    Jinja `chat_template` in it, rendered as transformers' `apply_chat_template` renders it
    (the same sandboxed environment, filters and variables, add_generation_prompt=True);
  - a run of jaxllm's instruct or dpo tasks: the prompt template it was trained with
    (instruct.template of jaxllm/data/instruction.py, alpaca or phi3), earlier turns as the
    records it learned from, the prompt ending where its response begins;
  - any other run (pretraining only): none, and chat requests are refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
from typing import Any, Callable

import jinja2
import jinja2.ext
import jinja2.sandbox
import ml_collections

from jaxllm.data import instruction
from jaxllm.errors import JaxllmError

# Between the turns of a conversation: what separates the parts of each template's prompt.
TURN_SEPARATORS = {"alpaca": "\n\n", "phi3": "\n"}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """`template(messages) -> prompt`; `stop`: strings that end the assistant's turn besides the
  tokenizer's end-of-text token (a converted model's eos_token, e.g. Qwen's <|im_end|>)."""

  render: Callable[[list[dict]], str]
  stop: tuple[str, ...] = ()

  def __call__(self, messages: list[dict]) -> str:
    return self.render(messages)


def instruction_template(template: str = "alpaca") -> ChatTemplate:
  """The prompt format of jaxllm's instruction-tuned runs, for a conversation.

  The last user message is the instruction; earlier user/assistant pairs come first, each as a
  training record (prompt, then response) would. A system message opens the prompt as a
  paragraph of its own: the template's own preamble stays, since it is what the model was
  trained to see, and replacing it would take the prompt off that format.
  """
  instruction.format_prompt({"instruction": ""}, template)  # an unknown template: JaxllmError
  separator = TURN_SEPARATORS.get(template, "\n\n")

  def render(messages: list[dict]) -> str:
    system, turns = [], []  # turns: [user text, assistant text or None]
    for message in messages:
      role, text = message["role"], message["content"]
      if role in ("system", "developer"):
        system.append(text)
      elif role == "user":
        turns.append([text, None])
      elif role == "assistant" and turns and turns[-1][1] is None:
        turns[-1][1] = text
      else:
        raise JaxllmError(f"the {template} chat template takes system, user and assistant "
                          f"messages, each assistant one answering a user one; got {role!r}")
    if not turns or turns[-1][1] is not None:
      raise JaxllmError("the last message must be the user's (the one the reply answers)")
    parts = [instruction.format_prompt({"instruction": user}, template)
             + instruction.format_response({"output": reply or ""}, template)
             for user, reply in turns]
    if system:
      parts.insert(0, "\n".join(system))
    return separator.join(parts)

  return ChatTemplate(render)


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  """transformers' tojson: plain json.dumps (Jinja's own escapes HTML characters)."""
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
  return datetime.datetime.now().strftime(format)


def jinja_template(source: str, special_tokens: dict[str, str] | None = None,
                   name: str = "chat_template") -> ChatTemplate:
  """A Hugging Face chat template, rendered as transformers does: `messages`,
  add_generation_prompt=True, and the special tokens (bos_token, eos_token, ...) as variables."""
  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  environment.filters["tojson"] = _tojson
  environment.globals["raise_exception"] = _raise_exception
  environment.globals["strftime_now"] = _strftime_now
  try:
    compiled = environment.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise JaxllmError(f"{name} is not a valid Jinja template ({e.message}, line {e.lineno})"
                      ) from None
  tokens = dict(special_tokens or {})

  def render(messages: list[dict]) -> str:
    try:
      return compiled.render(messages=messages, tools=None, documents=None,
                             add_generation_prompt=True, **tokens)
    except jinja2.TemplateError as e:  # raise_exception(...): the template refuses the messages
      raise JaxllmError(f"the model's chat template refused the messages: {e}") from None

  eos = tokens.get("eos_token")
  return ChatTemplate(render, (eos,) if eos else ())


def _token_text(value: Any) -> str | None:
  """A special token of tokenizer_config.json: a string, or an AddedToken's {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _template_source(value: Any) -> str | None:
  """tokenizer_config.json's chat_template: a string, or a list of named ones ("default")."""
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    value = named.get("default", next(iter(named.values()), None))
  return value if isinstance(value, str) and value else None


def chat_template_for(workdir: str | pathlib.Path, config: ml_collections.ConfigDict
                      ) -> ChatTemplate | None:
  """The chat template of a run directory (see the module's docstring), or None."""
  path = pathlib.Path(workdir) / "tokenizer_config.json"
  if path.is_file():
    try:
      settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise JaxllmError(f"cannot read {path} ({e}); copy it again from the model's folder"
                        ) from None
    source = _template_source(settings.get("chat_template"))
    if source:
      tokens = {key: _token_text(value) for key, value in settings.items()
                if key.endswith("_token")}
      return jinja_template(source, {k: v for k, v in tokens.items() if v}, str(path))
  if config.train.task in ("instruct", "dpo"):
    return instruction_template(config.instruct.template)
  return None
