"""Every command the documentation writes must still run: `jaxllm ...` lines parse with the CLI's
own parsers, their `--config.KEY=VALUE` overrides name real keys, and the files they and the
`python` / `bash` / `source` lines name exist. Nothing is executed and no model is built.

Pages: README.md, docs/**/*.md and launch/**/*.md, found by glob (no page names or lines
are written here).

Where commands are looked for:
  - code: lines of ``` / ~~~ fences, and indented code (4+ spaces after a blank line, or
    continuing such a block). Lines are read as a shell reads them: `# comments` dropped, a
    line ending in `\\` joined to the next, a quoted string may span lines, and commands are
    split at `&&`, `||`, `;`, `(`, `)` starting a word and at `|`, `&` written as words of
    their own (`a|b` is the docs' alternatives, below). A command starts a
    line or follows such an operator, after any `NAME=value` assignments and a wrapper
    (srun, env, exec, time, nohup, or a `$` prompt). A quoted argument that is shell (after
    `-c`, the value of `--command`, or text holding a newline, `&&`, `||` or `;`: `bash -c
    '...'`, `gcloud ... --command='...'`) is searched again for commands of its own.
  - inline: a `backtick` span (it may run over a line break) that starts with `jaxllm `,
    `python `, `bash ` or `source `.
A command word is `jaxllm` (or a path ending in /jaxllm), `python` / `python3` (`python -m
jaxllm.cli ARGS` is a jaxllm command too), or `bash` / `sh` / `source`. In code, `jaxllm WORD`
counts only when WORD is a subcommand or a `-flag` follows, so prose indented like code
("jaxllm keeps it out") is not a command; a misspelt subcommand followed by flags is reported.

The docs' own notation, before parsing:
  - `[ ... ]`: an optional part. Its brackets are dropped and its flags checked like the
    others (`[--workdir DIR]` -> `--workdir DIR`); a part with no flag (`[options]`) is
    dropped whole.
  - `...` (or the ellipsis character): arguments left out; dropped, and the command is then
    "partial" (below).
  - `<...>` (`<name>`, `<jaxllm git URL>`): a placeholder. Inside a path it matches anything
    (`experiments/<task>.py` must match at least one file); as a whole argument it is a
    placeholder value.
  - placeholder values: `<...>`, an upper-case word (DIR, FILE, N, TARGET) and `$VAR`. After
    a flag that takes a number or one of some choices, a valid value stands in for it, so
    the flag itself is still checked (`--max-new-tokens N`, `--vectorize K`); in a place where
    argparse needs a subcommand or target (`jaxllm launch TARGET`), what follows it can't be
    parsed and is not.
  - `A|B` written without spaces: alternatives; the first is checked.
  - an override whose key has an upper-case part (`--config.KEY=VALUE`, `--param KEY=V1,V2`)
    is a placeholder and not checked; one with a placeholder value (`--config.train.steps=N`)
    has its key checked only.
  - `--help` / `-h`: dropped; the command is then partial.
  - redirections (`> FILE`, `2>&1`) are dropped.
A partial command (an inline span, or one with `...` or `--help`) may lack required
arguments, may end with a flag whose value it leaves out (`jaxllm generate --workdir`) and, for
launch, the command after `--`; everything it does write must parse.

The checks, for each jaxllm command:
  - the subcommand exists, and the arguments parse with `jaxllm.cli.commands._parser()`
    (after `_split_config_overrides`, as `main` does); `jaxllm launch` with
    `jaxllm.tools.launch._parser()` up to `--`, and the command after `--` as a jaxllm
    command of its own;
  - overrides only on the subcommands `main` accepts them for; each applies with
    `jaxllm.config.apply_overrides` to the config the command names (its experiment file's
    `get_config()`, else `default_config()`), so an unknown or renamed key or a badly typed
    value is an error; for `eval`, `check_read_back_overrides` and the `--text` rule too;
  - `--config` / reproduce's experiment exists; a full `sweep` passes `sweep.sweep_spec` (its
    `--param` keys are config keys), a partial one `sweep.parse_param` and the keys;
  - `reproduce` gets one experiment file or --all.
For every command, an argument that is a path into the repository (its first part a top-level
folder that .gitignore does not ignore, like experiments/ or scripts/; not runs/ or .venv/)
must exist, and so must the script of python / bash / source (such a path, or a .py / .sh
name beside README.md) and the module of `python -m` when it is the repository's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fnmatch
import functools
import io
import pathlib
import re
from typing import Iterator

import pytest

from jaxllm.cli import commands as cli_commands

REPO = pathlib.Path(__file__).resolve().parents[1]
# The pages held 86 jaxllm commands and 18 python / bash / source ones when this was written,
# while README.md was being split into docs/ (the README's own summary holds 25 and 4 of them).
# The floors keep the test from passing on an extractor that finds nothing, with room for that
# split to drop the summary.
MIN_JAXLLM_COMMANDS = 50
MIN_SCRIPT_COMMANDS = 10

PLACEHOLDER = "<>"  # what a `<...>` placeholder becomes
OPERATORS = ("&&", "||", ";", "|", "&", "(", ")")
WRAPPERS = {"srun", "env", "exec", "time", "nohup", "$"}  # "$": a prompt written before a command
SCRIPT_WORDS = {"bash", "sh", "source", "."}
OVERRIDE_COMMANDS = cli_commands.OVERRIDE_COMMANDS


def doc_pages() -> list[pathlib.Path]:
  pages = [REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("launch/**/*.md")]
  return sorted({p for p in pages if p.is_file()})


# --- Reading markdown -------------------------------------------------------------------------


@dataclasses.dataclass
class Snippet:
  text: str
  line: int  # of the snippet's first line, from 1
  inline: bool


def snippets(markdown: str) -> Iterator[Snippet]:
  """The code blocks (fenced or indented), each as one text, and the inline code spans."""
  lines = markdown.splitlines()
  prose: list[tuple[int, str]] = []

  def flush_prose():
    if prose:
      yield from _inline_spans(prose)
      prose.clear()

  i = 0
  while i < len(lines):
    line = lines[i]
    fence = re.match(r"\s{0,3}(`{3,}|~{3,})", line)
    if fence:
      yield from flush_prose()
      marker, start, i = fence.group(1), i + 1, i + 1
      while i < len(lines) and not lines[i].strip().startswith(marker):
        i += 1
      yield Snippet("\n".join(lines[start:i]), start + 1, inline=False)
      i += 1
      continue
    indented = re.match(r"( {4,}|\t)", line) and line.strip()
    if indented and (i == 0 or not lines[i - 1].strip()):
      yield from flush_prose()
      start = i
      while i < len(lines) and (not lines[i].strip() or re.match(r"( {4,}|\t)", lines[i])):
        i += 1
      yield Snippet("\n".join(lines[start:i]), start + 1, inline=False)
      continue
    if line.strip():
      prose.append((i + 1, line))
    else:
      yield from flush_prose()
    i += 1
  yield from flush_prose()


def _inline_spans(paragraph: list[tuple[int, str]]) -> Iterator[Snippet]:
  text = "\n".join(line for _, line in paragraph)
  first = paragraph[0][0]
  for match in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, re.DOTALL):
    span = " ".join(match.group(2).split())
    yield Snippet(span, first + text.count("\n", 0, match.start()), inline=True)


# --- Reading shell ----------------------------------------------------------------------------


@dataclasses.dataclass
class Token:
  text: str
  line: int
  operator: bool = False
  quoted: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (text, line)


def shell_tokens(text: str, line: int = 1) -> list[Token]:
  """Words and operators as a shell splits them: comments dropped, `\\` + newline joined,
  quotes removed (their contents kept in `quoted`, to be searched again). An unclosed quote
  runs to the end."""
  tokens: list[Token] = []
  word: list[str] | None = None
  current: Token | None = None
  i = 0

  def end_word():
    nonlocal word, current
    if word is not None:
      current.text = "".join(word)
      tokens.append(current)
    word, current = None, None

  def start_word():
    nonlocal word, current
    if word is None:
      word, current = [], Token("", line)

  while i < len(text):
    c = text[i]
    if c == "\\" and i + 1 < len(text):
      if text[i + 1] == "\n":
        line += 1
        i += 2
        continue
      start_word()
      word.append(text[i + 1])
      i += 2
      continue
    if c in "'\"":
      start_word()
      end = i + 1
      while end < len(text) and text[end] != c:
        end += 2 if c == '"' and text[end] == "\\" else 1
      content = text[i + 1:end]
      current.quoted.append((content, line))
      word.append(content if c == "'" else re.sub(r"\\(.)", r"\1", content))
      line += content.count("\n")
      i = end + 1
      continue
    if c == "#" and word is None:
      while i < len(text) and text[i] != "\n":
        i += 1
      continue
    if c in " \t":
      end_word()
      i += 1
      continue
    if c == "\n":
      end_word()
      tokens.append(Token("\n", line, operator=True))
      line += 1
      i += 1
      continue
    if word is None:
      op = next((o for o in OPERATORS if text.startswith(o, i)), None)
      if op and (op not in ("|", "&") or i + 1 >= len(text) or text[i + 1] in " \t\n"):
        tokens.append(Token(op, line, operator=True))
        i += len(op)
        continue
    start_word()
    word.append(c)
    i += 1
  end_word()
  return tokens


@dataclasses.dataclass
class Command:
  program: str  # "jaxllm" or "script" (python, bash, sh, source)
  words: list[str]  # the command word and its arguments, as written (after shell parsing)
  line: int
  inline: bool
  page: str = ""

  @property
  def text(self) -> str:
    return " ".join(" ".join(self.words).split())


def _program(word: str) -> str | None:
  name = word.rsplit("/", 1)[-1]
  if name == "jaxllm":
    return "jaxllm"
  if re.fullmatch(r"python(3(\.\d+)?)?", name) or word in SCRIPT_WORDS:
    return "script"
  return None


def commands_in(text: str, line: int = 1, inline: bool = False) -> list[Command]:
  """The jaxllm, python and bash commands of a shell text."""
  found: list[Command] = []
  tokens = shell_tokens(text, line)
  i = 0
  while i < len(tokens):
    while i < len(tokens) and tokens[i].operator:
      i += 1
    start = i
    while i < len(tokens) and not tokens[i].operator:
      i += 1
    simple = tokens[start:i]
    k = 0
    while k < len(simple) and re.match(r"[A-Za-z_]\w*=", simple[k].text):
      k += 1
    if k < len(simple) and simple[k].text in WRAPPERS:
      k += 1
      while k < len(simple) and simple[k].text.startswith("-"):
        k += 1
    words = [t.text for t in simple[k:]]
    program = _program(words[0]) if words else None
    if program == "jaxllm" and not inline:
      rest = words[1:]
      if not rest or not (rest[0] in _subcommands() or any(w.startswith("-") for w in rest)):
        program = None  # prose, or `cd jaxllm`
    if program:
      found.append(Command(program, words, simple[k].line, inline))
    for j, token in enumerate(simple):  # a quoted argument may be a shell text of its own
      shell = token.text.startswith("--command") or (j and simple[j - 1].text == "-c")
      for content, at in token.quoted:
        if shell or re.search(r"\n|&&|\|\||;", content):
          found += commands_in(content, at, inline)
  return found


def extract(markdown: str, page: str = "") -> list[Command]:
  """Every command of a page, each with its page and line."""
  found = []
  for snippet in snippets(markdown):
    if snippet.inline:
      first = snippet.text.split(" ", 1)[0]
      if " " not in snippet.text or _program(first) is None:
        continue
    for command in commands_in(snippet.text, snippet.line, snippet.inline):
      command.page = page
      found.append(command)
  return found


# --- The docs' notation -----------------------------------------------------------------------


def is_placeholder(word: str) -> bool:
  return (word == PLACEHOLDER or re.fullmatch(r"[A-Z][A-Z0-9_]*", word) is not None
          or re.fullmatch(r"\$\{?\w+\}?", word) is not None)


def _key_is_placeholder(key: str) -> bool:
  return any(re.fullmatch(r"[A-Z][A-Z0-9_]*", part) for part in key.split("."))


@dataclasses.dataclass
class Args:
  argv: list[str]
  partial: bool


def normalize(words: list[str], partial: bool) -> Args:
  """The arguments of a command as the docs write them, as a parser can read them (see the
  module docstring)."""
  merged: list[str] = []
  i = 0
  while i < len(words):  # <several words> is one placeholder
    word = words[i]
    close = next((j for j in range(i + 1, len(words)) if ">" in words[j]), None)
    if len(word) > 1 and word.startswith("<") and ">" not in word and close is not None:
      merged.append(PLACEHOLDER + words[close].split(">", 1)[1])
      i = close + 1
      continue
    merged.append(re.sub(r"<[^<>]*>", PLACEHOLDER, word))
    i += 1
  out: list[str] = []
  groups: list[int] = []  # where each open [ part starts in out
  skip_next = False
  for word in merged:
    if skip_next:
      skip_next = False
      continue
    if re.fullmatch(r"\d*(>>?|<|&>)", word):
      skip_next = True
      continue
    if re.fullmatch(r"\d*>&\d+", word):
      continue
    opened = len(word) - len(word.lstrip("["))
    word = word.lstrip("[")
    groups += [len(out)] * opened
    closed = 0
    while word.endswith("]") and groups and closed < len(groups):
      word, closed = word[:-1], closed + 1
    if word in ("...", "\u2026"):
      partial = True
    elif word in ("--help", "-h"):
      partial = True
    elif word:
      if "|" in word and not word.startswith("|"):
        word = word.split("|", 1)[0]
      out.append(word)
    for _ in range(closed):
      begin = groups.pop()
      if not any(w.startswith("-") for w in out[begin:]):
        del out[begin:]
  return Args(out, partial)


# --- Checking ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _subcommands() -> frozenset[str]:
  return frozenset(_subparsers(_jaxllm_parser()))


def _jaxllm_parser() -> argparse.ArgumentParser:
  from jaxllm.cli import commands

  return commands._parser()


def _launch_parser() -> argparse.ArgumentParser:
  from jaxllm.tools import launch

  return launch._parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      return dict(action.choices)
  return {}


def _loosen(parser: argparse.ArgumentParser) -> None:
  """Nothing required: a partial command may leave required arguments out."""
  for action in parser._actions:
    action.required = False
  for sub in _subparsers(parser).values():
    _loosen(sub)


def _sample(action: argparse.Action, placeholder: str) -> str:
  """A value `action` accepts, for a placeholder written in its place."""
  if not action.choices and action.type is None:
    return placeholder  # any text will do
  for value in [str(c) for c in action.choices] if action.choices else ["1", "1.0"]:
    try:
      if action.type is None or action.type(value) is not None:
        return value
    except (TypeError, ValueError):
      continue
  return placeholder


def _fill(argv: list[str], parser: argparse.ArgumentParser, partial: bool) -> list[str]:
  """Placeholders after typed flags replaced by values they accept; a partial command's last
  flag without its value dropped."""
  argv = list(argv)
  options = parser._option_string_actions
  for i, word in enumerate(argv):
    name, eq, value = word.partition("=")
    action = options.get(name)
    if action is None or action.nargs == 0:
      continue
    if eq and is_placeholder(value):
      argv[i] = f"{name}={_sample(action, value)}"
    elif not eq and i + 1 < len(argv) and is_placeholder(argv[i + 1]):
      argv[i + 1] = _sample(action, argv[i + 1])
  if partial and argv and argv[-1] in options and options[argv[-1]].nargs != 0:
    argv.pop()
  return argv


def _parse_twice(make_parser, argv: list[str], subcommand: str | None, partial: bool):
  """(namespace or None, argparse's error): first with nothing required, so that a misspelt
  flag is named as unrecognized rather than as a required one missing; then, for a full
  command, as written."""
  parsed, error = None, ""
  for strict in (False, True)[:1 if partial else 2]:
    parser = make_parser()
    if not strict:
      _loosen(parser)
    sub = _subparsers(parser).get(subcommand) if subcommand else None
    parsed, error = _parse(parser, _fill(argv, sub, partial) if sub else argv)
    if parsed is None:
      break
  return parsed, error


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace | None,
                                                                    str]:
  """parse_args, its error message caught."""
  stderr = io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
      return parser.parse_args(argv), ""
  except SystemExit:
    lines = stderr.getvalue().strip().splitlines()
    return None, lines[-1] if lines else "argparse exited"


@functools.lru_cache(maxsize=None)
def _ignored_top_level() -> tuple[str, ...]:
  gitignore = REPO / ".gitignore"
  patterns = [".git"]
  if gitignore.is_file():
    for line in gitignore.read_text().splitlines():
      line = line.strip()
      if line and not line.startswith(("#", "!")):
        patterns.append(line.strip("/"))
  return tuple(patterns)


def _repo_folder(name: str) -> bool:
  """Whether `name` is a top-level folder of the repository (one .gitignore does not ignore)."""
  return ((REPO / name).is_dir()
          and not any(fnmatch.fnmatch(name, p) for p in _ignored_top_level()))


def _path_missing(path: str) -> bool:
  pattern = path.replace(PLACEHOLDER, "*")
  if "*" in pattern or "?" in pattern:
    return not list(REPO.glob(pattern.rstrip("/")))
  return not (REPO / path).exists()


def _repo_paths(words: list[str]) -> list[str]:
  """The arguments (or the values after `=` of `--flag=path`, `KEY=path`) that are paths into
  the repository."""
  paths = []
  for word in words:
    for candidate in (word, word.split("=", 1)[-1]):
      if ("/" in candidate and not candidate.startswith(("/", "$", "~", "-"))
          and "://" not in candidate and _repo_folder(candidate.split("/", 1)[0])):
        paths.append(candidate)
        break
  return paths


def _script_path(path: str) -> bool:
  """Whether the script of python / bash / source is the repository's: a path into one of its
  folders, or a .py / .sh file beside README.md."""
  if "/" in path:
    return bool(_repo_paths([path]))
  return _relative_file(path) and path.endswith((".py", ".sh"))


def _relative_file(path: str) -> bool:
  return not path.startswith(("/", "$", "~", "-")) and not is_placeholder(path)


@functools.lru_cache(maxsize=None)
def _experiment(path: str):
  from jaxllm import config as config_lib

  return config_lib.load_experiment(REPO / path)


def check_script(command: Command) -> list[str]:
  """python / bash / source: the script or `-m` module, and repository paths, exist."""
  problems = []
  args = normalize(command.words[1:], command.inline).argv
  word = command.words[0].rsplit("/", 1)[-1]
  i = 0
  while i < len(args) and args[i].startswith("-"):
    if args[i] == "-c":  # code in a string, searched on its own
      return []
    if args[i] == "-m" and word.startswith("python") and i + 1 < len(args):
      module = args[i + 1]
      parts = module.split(".")
      if _repo_folder(parts[0]):
        base = REPO.joinpath(*parts)
        if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
          problems.append(f"module {module}: not found in the repository")
      rest = args[i + 2:]
      if module in ("jaxllm.cli", "jaxllm.cli.__main__"):
        words = command.words[command.words.index(module) + 1:]
        return problems + check_jaxllm(
            Command("jaxllm", ["jaxllm", *words], command.line, command.inline, command.page))
      return problems + [f"{p}: not found" for p in _repo_paths(rest) if _path_missing(p)]
    i += 1
  if i < len(args) and _script_path(args[i]):
    if _path_missing(args[i]):
      problems.append(f"{args[i]}: not found")
    i += 1
  problems += [f"{p}: not found" for p in _repo_paths(args[i:]) if _path_missing(p)]
  return problems


def check_jaxllm(command: Command) -> list[str]:
  """The problems of one jaxllm command; [] when it would parse and its overrides apply."""
  args = normalize(command.words[1:], command.inline)
  problems = [f"{p}: not found" for p in _repo_paths(args.argv) if _path_missing(p)]
  return problems + _check_argv(args.argv, args.partial)


def _check_argv(argv: list[str], partial: bool) -> list[str]:
  from jaxllm.cli import commands

  subcommand = next((w for w in argv if not w.startswith("-")), None)
  if subcommand is not None and is_placeholder(subcommand):
    return []
  if subcommand is not None and subcommand not in _subcommands():
    return [f"unknown subcommand '{subcommand}' (jaxllm has: {', '.join(sorted(_subcommands()))})"]
  if subcommand == "launch":
    return _check_launch(argv[argv.index("launch") + 1:], partial)
  rest, overrides = commands._split_config_overrides(argv)
  parsed, error = _parse_twice(_jaxllm_parser, rest, subcommand, partial)
  if parsed is None:
    return [f"does not parse: {error}"]
  problems = []
  if overrides and parsed.command not in OVERRIDE_COMMANDS:
    problems.append(f"--config.{overrides[0]} only applies to `jaxllm "
                    f"{'`, `'.join(OVERRIDE_COMMANDS)}`")
  experiment = getattr(parsed, "config", None) or getattr(parsed, "experiment", None)
  module = config = None
  if experiment and not is_placeholder(experiment):
    if _relative_file(experiment) and _path_missing(experiment):
      problems.append(f"{experiment}: not found")
    elif PLACEHOLDER not in experiment and _relative_file(experiment):
      from jaxllm.errors import JaxllmError

      try:
        module, config = _experiment(experiment)
      except JaxllmError as e:
        problems.append(str(e))
  problems += _check_overrides(parsed, overrides, config)
  if parsed.command == "reproduce" and not partial and parsed.all == bool(parsed.experiment):
    problems.append("give one experiment file, or --all (not both)")
  if parsed.command == "sweep":
    problems += _check_sweep(parsed, module, partial)
  return problems


def _check_overrides(parsed: argparse.Namespace, overrides: list[str], config) -> list[str]:
  from jaxllm import config as config_lib
  from jaxllm.errors import JaxllmError

  config = copy.deepcopy(config) if config is not None else config_lib.default_config()
  problems = []
  checked = []
  for override in overrides:
    key, _, value = override.partition("=")
    if _key_is_placeholder(key):
      continue
    if is_placeholder(value) and _has_key(config, key):
      continue  # the key is real; the value is the docs' placeholder
    checked.append(override)
    try:
      config_lib.apply_overrides(config, [override])
    except JaxllmError as e:
      problems.append(f"--config.{override}: {e}")
  if parsed.command == "serve":
    other = [o for o in checked if not o.startswith(("model.", "mesh."))]
    if other:
      problems.append(f"--config.{other[0]} has no effect on `jaxllm serve`")
  if parsed.command in ("eval", "serve") and checked:
    try:
      config_lib.check_read_back_overrides(checked, parsed.workdir)
    except JaxllmError as e:
      problems.append(str(e))
    other = [o for o in checked if not o.startswith("model.")]
    if getattr(parsed, "text", None) and other:
      problems.append(f"--config.{other[0]} has no effect on `jaxllm eval --text`")
    other = [o for o in checked if not o.startswith(("model.", "mesh."))]
    if getattr(parsed, "tasks", None) and other:
      problems.append(f"--config.{other[0]} has no effect on `jaxllm eval --tasks`")
  return problems


def _has_key(config, key: str) -> bool:
  import ml_collections

  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return not isinstance(node, ml_collections.ConfigDict)


def _check_sweep(parsed: argparse.Namespace, module, partial: bool) -> list[str]:
  from jaxllm import config as config_lib
  from jaxllm.errors import JaxllmError
  from jaxllm.tools import sweep

  params = [p for p in parsed.param if not _key_is_placeholder(p.partition("=")[0])]
  if len(params) < len(parsed.param) or module is None:
    partial = True
  try:
    if not partial:
      sweep.sweep_spec(module, params, trials=parsed.trials, sampler=parsed.sampler,
                       pruner=parsed.pruner, metric=parsed.metric, direction=parsed.direction,
                       seed=parsed.seed, grace_seconds=parsed.grace_seconds,
                       vectorize=parsed.vectorize)
      return []
    known = config_lib.default_config()
    for param in params:
      key, _ = sweep.parse_param(param)
      if not _has_key(known, key):
        return [f"--param {param}: '{key}' is not a config key"]
  except JaxllmError as e:
    return [str(e)]
  return []


def _check_launch(argv: list[str], partial: bool) -> list[str]:
  split = argv.index("--") if "--" in argv else len(argv)
  own, inner = argv[:split], argv[split + 1:]
  problems = []
  target = next((w for w in own if not w.startswith("-")), None)
  if target is not None and is_placeholder(target):
    pass  # `jaxllm launch TARGET [options]`: nothing of it can be parsed
  else:
    parsed, error = _parse_twice(_launch_parser, own, target, partial)
    if parsed is None:
      problems.append(f"launch does not parse: {error}")
  if not inner or (len(inner) == 1 and is_placeholder(inner[0])):
    if not partial:
      problems.append("jaxllm launch needs the command to run after --")
    return problems
  return problems + [f"after --: {p}" for p in _check_argv(inner, partial)]


def check(command: Command) -> list[str]:
  problems = check_jaxllm(command) if command.program == "jaxllm" else check_script(command)
  return list(dict.fromkeys(problems))


def report(commands: list[Command]) -> list[str]:
  return [f"{c.page}:{c.line}: `{c.text}`: {p}" for c in commands for p in check(c)]


@functools.lru_cache(maxsize=None)
def _doc_commands() -> tuple[Command, ...]:
  found = []
  for page in doc_pages():
    found += extract(page.read_text(), str(page.relative_to(REPO)))
  return tuple(found)


# --- Tests ------------------------------------------------------------------------------------


SYNTHETIC = """\
# A page

Train it (`jaxllm train --config experiments/shakespeare_char.py --workdir
runs/x`), or see `jaxllm eval`; jaxllm keeps it quick. `jaxllm.load_run` is Python.

    jaxllm train --config experiments/shakespeare_char.py \\
        --config.train.steps=20        # twenty steps
    XLA_FLAGS=--xla_force_host_platform_device_count=8 jaxllm finetune \\
        --config experiments/<task>.py [--workdir DIR] [--config.KEY=VALUE ...]
    jaxllm generate --workdir DIR --max-new-tokens N --prompt "a jaxllm train" && \\
        python benchmarks/vs_pytorch.py
    ssh host --command='cd jaxllm && .venv/bin/jaxllm eval --workdir DIR \\
        --text FILE'

```bash
bash scripts/quickstart.sh  # the quickstart
jaxllm launch local --processes 2 -- train --config experiments/shakespeare_char.py ...
```

    jaxllm end at 1.9 (not a command: indented prose)
"""


def test_extractor_finds_commands_in_a_synthetic_page():
  found = [(c.line, c.inline, c.text) for c in extract(SYNTHETIC, "synthetic.md")]
  assert found == [
      (3, True, "jaxllm train --config experiments/shakespeare_char.py --workdir runs/x"),
      (4, True, "jaxllm eval"),
      (6, False, "jaxllm train --config experiments/shakespeare_char.py "
                 "--config.train.steps=20"),
      (8, False, "jaxllm finetune --config experiments/<task>.py [--workdir DIR] "
                 "[--config.KEY=VALUE ...]"),
      (10, False, "jaxllm generate --workdir DIR --max-new-tokens N --prompt a jaxllm train"),
      (11, False, "python benchmarks/vs_pytorch.py"),
      (12, False, ".venv/bin/jaxllm eval --workdir DIR --text FILE"),
      (16, False, "bash scripts/quickstart.sh"),
      (17, False, "jaxllm launch local --processes 2 -- train --config "
                  "experiments/shakespeare_char.py ..."),
  ]
  assert normalize(found[3][2].split()[1:], False) == Args(
      ["finetune", "--config", "experiments/<>.py", "--workdir", "DIR", "--config.KEY=VALUE"],
      partial=True)
  assert report(extract(SYNTHETIC, "synthetic.md")) == []


def test_checker_reports_stale_commands():
  page = """\
    jaxllm train --confg experiments/shakespeare_char.py
    jaxllm train --config experiments/shakespeare_char.py --config.train.stepz=3
    jaxllm train --config experiments/no_such_experiment.py
    jaxllm pretrain --config experiments/shakespeare_char.py
    jaxllm generate --workdir DIR --max-new-tokens many
    jaxllm eval --workdir DIR --config.model.n_layer=2
    jaxllm launch slurm --nodes 2 --gpu-per-node 8 -- train --config experiments/<name>.py
    jaxllm launch local --processes 2 -- train --config experiments/<name>.py --workdr x
    jaxllm sweep --config experiments/shakespeare_char.py --param train.learning_rat=1e-3,3e-3
    bash scripts/no_such_script.sh

Inline too: `jaxllm convert --form gpt2 --out runs/gpt2` and `python benchmarks/gone.py`.
"""
  problems = report(extract(page, "bad.md"))
  expected = [
      ("bad.md:1:", "unrecognized arguments: --confg experiments/shakespeare_char.py"),
      ("bad.md:2:", "unknown config key 'train.stepz'"),
      ("bad.md:3:", "experiments/no_such_experiment.py: not found"),
      ("bad.md:4:", "unknown subcommand 'pretrain'"),
      ("bad.md:5:", "invalid int value: 'many'"),
      ("bad.md:6:", "the architecture of DIR is the one in its config.json"),
      ("bad.md:7:", "unrecognized arguments: --gpu-per-node 8"),
      ("bad.md:8:", "after --: does not parse"),
      ("bad.md:9:", "sweep parameter 'train.learning_rat' is not a config key"),
      ("bad.md:10:", "scripts/no_such_script.sh: not found"),
      ("bad.md:12:", "unrecognized arguments: --form"),
      ("bad.md:12:", "benchmarks/gone.py: not found"),
  ]
  assert len(problems) == len(expected), "\n".join(problems)
  for problem, (where, what) in zip(problems, expected):
    assert problem.startswith(where) and what in problem, problem


def test_documented_commands_are_found():
  commands = _doc_commands()
  jaxllm_commands = [c for c in commands if c.program == "jaxllm"]
  scripts = [c for c in commands if c.program == "script"]
  assert len(jaxllm_commands) >= MIN_JAXLLM_COMMANDS, [c.text for c in jaxllm_commands]
  assert len(scripts) >= MIN_SCRIPT_COMMANDS, [c.text for c in scripts]


@pytest.mark.parametrize("program", ["jaxllm", "script"])
def test_documented_commands_still_run(program):
  problems = report([c for c in _doc_commands() if c.program == program])
  assert not problems, ("commands in the docs that no longer parse or name what is gone:\n"
                        + "\n".join(problems))
