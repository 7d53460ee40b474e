"""EleutherAI's lm-evaluation-harness in-process: a jaxllm run as an `lm_eval` model.

    jaxllm eval --workdir RUN --tasks hellaswag,arc_easy [--num-fewshot K] [--limit N]
    jaxllm eval --workdir RUN --tasks my_task --include-path DIR   (task YAMLs of local files)

`JaxllmLM` answers the harness's three requests on the run's own tokenizer and network:

- `loglikelihood` (context, continuation): the tokens of context + continuation (lm_eval's
  TemplateLM splits them, an empty context becoming the end-of-text token), cut from the
  left to context_length + 1 as lm_eval's `hf` model cuts them; the sum of the
  continuation's log-probabilities (float32 log-softmax) and whether each of its tokens is
  the argmax.
- `loglikelihood_rolling` (text): the text's tokens after an end-of-text token, in the
  disjoint windows of lm_eval's `get_rolling_token_windows` / `make_disjoint_window`
  (every token scored once, each window as long as the context allows), summed.
- `generate_until` (context, gen_kwargs): jaxllm's KV-cached decoding
  (jaxllm/serve/generate.py), greedy unless `do_sample` with a temperature, for
  `max_gen_toks` tokens or to the end-of-text token, cut at the first `until` string. The
  context is cut from the left to context_length - max_gen_toks (as the `hf` model cuts it);
  a max_gen_toks of the context length or more keeps half the context and decodes past it
  as `jaxllm generate` does.

Requests become rows of a few fixed shapes, one compile each, on the run's mesh (the choices
after one context run it once); with several
processes the harness runs on process 0 and every process runs each batch
(jaxllm/eval/scoring.py). The harness's bootstrap of standard errors forks a process pool,
which a process running JAX must not do: `run_tasks` passes bootstrap_iters=0.
"""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict
from typing import Any, Sequence

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.errors import JaxllmError
from jaxllm.eval.scoring import (
  Devices,
  Row,
  bucket_for,
  bucket_lengths,
  continuation_row,
  score_rows,
)
from jaxllm.models.gpt import GPT, count_params
from jaxllm.progress import progress_bar
from jaxllm.training import multihost, sharding
from jaxllm.training import rundir as run_io

try:
  from lm_eval import evaluator as lm_evaluator
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.models import utils as lm_model_utils
except ModuleNotFoundError as e:
  if e.name != "lm_eval":
    raise
  raise JaxllmError("lm-evaluation-harness is not installed; install jaxllm's eval extra: "
                    "pip install -e .[eval]") from None

# lm_eval's default for tasks that do not say (its `hf` model's max_gen_toks).
DEFAULT_MAX_GEN_TOKS = 256


def rolling_rows(tokens: Sequence[int], prefix_id: int, context_length: int) -> list[Row]:
  """A text's disjoint rolling windows (lm_eval's, with context_len 1): every token scored
  once, after the prefix token, each with as much context as fits."""
  windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
      token_list=list(tokens), prefix_token=prefix_id, max_seq_len=context_length,
      context_len=1))
  return [continuation_row(context, continuation, context_length)
          for context, continuation in windows]


class JaxllmLM(TemplateLM):
  """A jaxllm decoder as an lm_eval model: requests batched by length into fixed shapes on
  the mesh (see the module's docstring)."""

  backend = "causal"

  def __init__(self, model: GPT, params: Any, tokenizer: tokenizer_lib.Tokenizer, *,
               mesh=None, rules: Any = sharding.DEFAULT_RULES, batch_size: int = 8,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0, progress: bool = False,
               info: dict | None = None):
    """`params` on any devices: they are placed on `mesh` (default one device) with the
    shardings the rules give."""
    super().__init__()
    if not isinstance(model, GPT):
      raise JaxllmError("lm-evaluation-harness needs a GPT (decoder) run, not an encoder")
    self.model, self.run_tokenizer = model, tokenizer
    self.context_length = model.config.context_length
    mesh = mesh or sharding.make_mesh(config_lib.default_config().mesh, jax.devices()[:1])
    rules = tuple(rules)
    param_axes = sharding.model_axes(model)
    sharding.check_divisible(*param_axes, mesh, rules)
    shardings = sharding.param_shardings(param_axes[1], mesh, rules)
    params = jax.device_put(params, shardings)
    split = sharding.data_parallel_size(mesh, rules)
    self.batch_size_per_call = -(-int(batch_size) // split) * split  # whole batch shards
    if self.batch_size_per_call < 1:
      raise JaxllmError(f"--batch-size must be >= 1, got {batch_size}")
    self.devices = Devices(model, params, shardings, mesh, rules, tokenizer.vocab_size,
                           tokenizer.eot_id)
    self.buckets = bucket_lengths(self.context_length)
    self.max_gen_toks, self.seed, self.progress = int(max_gen_toks), int(seed), progress
    self._generate_calls = 0
    self._info = {"model_num_parameters": count_params(params),
                  "context_length": self.context_length, "buckets": list(self.buckets),
                  "batch_size": self.batch_size_per_call,
                  "mesh": {k: int(v) for k, v in mesh.shape.items()}, **(info or {})}

  # --- What TemplateLM asks of a model --------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.run_tokenizer.eot_id

  @property
  def max_length(self) -> int:
    return self.context_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                 ) -> list[int]:
    del add_special_tokens, kwargs  # jaxllm's tokenizers add none (no BOS)
    return self.run_tokenizer.encode(string)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.run_tokenizer.decode(tokens)

  def get_model_info(self) -> dict:
    return dict(self._info)

  # --- Scoring --------------------------------------------------------------------------

  def score_rows(self, rows: Sequence[Row], desc: str = "loglikelihood"
                 ) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, all greedy) of each row, in order (scoring.score_rows:
    shared prefixes run once, the other rows by bucket, longest first)."""
    bar = progress_bar(total=len(rows), desc=desc, disable=not self.progress)
    results = score_rows(self.devices, rows, self.batch_size_per_call, self.buckets,
                         bar.update)
    bar.close()
    return results

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    del disable_tqdm, kwargs
    rows = [continuation_row(context, continuation, self.context_length)
            for _, context, continuation in requests]
    results = self.score_rows(rows)
    for (strings, _, _), result in zip(requests, results):
      if strings is not None:
        self.cache_hook.add_partial("loglikelihood", strings, result)
    return results

  def rolling_loglikelihoods(self, texts: Sequence[str]) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each text, over its disjoint windows."""
    rows, owner = [], []
    for i, text in enumerate(texts):
      windows = rolling_rows(self.tok_encode(text), self.prefix_token_id, self.context_length)
      rows.extend(windows)
      owner.extend([i] * len(windows))
    totals = [0.0] * len(texts)
    counts = [0] * len(texts)
    for i, row, (logprob, _) in zip(owner, rows, self.score_rows(rows, "rolling")):
      totals[i] += logprob
      counts[i] += row.scored
    return list(zip(totals, counts))

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    texts = [request.args[0] for request in requests]
    results = [total for total, _ in self.rolling_loglikelihoods(texts)]
    for text, total in zip(texts, results):
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
    return results

  # --- Generation -----------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    results: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, request in enumerate(requests):
      groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
    bar = progress_bar(total=len(requests), desc="generate_until", disable=not self.progress)
    eos = self.tok_decode([self.eot_token_id])
    for members in groups.values():
      gen_kwargs = requests[members[0]].args[1]
      texts = self.generate_texts([requests[i].args[0] for i in members], gen_kwargs, eos)
      for i, text in zip(members, texts):
        results[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
      bar.update(len(members))
    bar.close()
    return results

  def generate_texts(self, contexts: Sequence[str], gen_kwargs: dict, eos: str | None = None
                     ) -> list[str]:
    """Completions of `contexts` under one request's gen_kwargs (until, max_gen_toks,
    do_sample, temperature, top_k, top_p), each cut at its first `until` string."""
    kwargs = lm_model_utils.normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
    until = lm_model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_new = int(kwargs.pop("max_gen_toks"))
    if max_new < 1:
      return ["" for _ in contexts]
    temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
    top_k, top_p = int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0)
    keep = self.context_length - max_new if max_new < self.context_length else (
        self.context_length // 2)
    prompts = [(self.tok_encode(c)[-keep:] if c else []) or [self.prefix_token_id]
               for c in contexts]
    size = self.batch_size_per_call
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), size):
      members = order[start:start + size]
      longest = max(len(prompts[i]) for i in members)
      length = min(bucket_for(longest, self.buckets), max(keep, longest))
      tokens_BxP = np.full((size, length), self.eot_token_id, np.int32)
      lengths_B = np.ones(size, np.int32)  # empty rows: one end-of-text token
      for b, i in enumerate(members):
        tokens_BxP[b, :len(prompts[i])] = prompts[i]
        lengths_B[b] = len(prompts[i])
      self._generate_calls += 1
      new = self.devices.generate(tokens_BxP, lengths_B, max_new, temperature, top_k, top_p,
                                  self.seed + self._generate_calls - 1)
      for b, i in enumerate(members):
        texts[i] = lm_model_utils.postprocess_generated_text(
            self.tok_decode(new[b]), stop=until, think_end_token=None)
    return texts


# --- Loading a run and running the harness -----------------------------------------------


def load(workdir: str | pathlib.Path, overrides: Sequence[str] = (), batch_size: int = 8,
         progress: bool = False) -> JaxllmLM:
  """A run directory as a JaxllmLM, its parameters restored straight onto the mesh of its
  config.mesh (after `overrides`: model.* for how the network runs, mesh.* for the devices)."""
  workdir = pathlib.Path(workdir)
  other = [o for o in overrides if not o.startswith(("model.", "mesh."))]
  if other:
    raise JaxllmError(f"--config.{other[0].split('=')[0]} has no effect on `jaxllm eval "
                      f"--tasks` (it reads only model.* and mesh.* keys); drop it")
  for name in ("config.json", "tokenizer.json", "params"):
    if not (workdir / name).exists():
      raise JaxllmError(f"{workdir / name} not found (is {workdir} the --workdir of a finished "
                        f"`jaxllm train` or `jaxllm convert` run?)")
  config = config_lib.from_dict(json.loads((workdir / "config.json").read_text()))
  config_lib.check_read_back_overrides(list(overrides), workdir)
  config_lib.apply_overrides(config, list(overrides))
  tokenizer = tokenizer_lib.from_json(json.loads((workdir / "tokenizer.json").read_text()))
  model = run_io.build_model(run_io.resolve_model(config.model, tokenizer))
  if not isinstance(model, GPT):
    raise JaxllmError(f"{workdir} holds an encoder (model.architecture=bert); "
                      f"lm-evaluation-harness needs a GPT (decoder) run")
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh.rules)
  abstract, axes = sharding.model_axes(model)
  sharding.check_divisible(abstract, axes, mesh, rules)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, sharding.param_shardings(axes, mesh, rules))
  params = run_io.load_params(workdir, target, fix=f"{workdir / 'config.json'} and the "
                                                   f"parameters disagree")
  return JaxllmLM(model, params, tokenizer, mesh=mesh, rules=rules, batch_size=batch_size,
                  progress=progress, info={"workdir": str(workdir.absolute())})


def task_manager(tasks: Sequence[str], include_path: str | pathlib.Path | None = None):
  """lm_eval's TaskManager: of `include_path` alone when it holds every task named (the
  catalog's ~15,000 entries take seconds to index), else of the catalog and it."""
  from lm_eval.tasks import TaskManager

  if include_path is not None:
    if not pathlib.Path(include_path).is_dir():
      raise JaxllmError(f"--include-path {include_path} is not a folder (it holds task YAML "
                        f"files)")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if all(name in local.all_tasks for name in tasks):
      return local
  manager = TaskManager(include_path=None if include_path is None else str(include_path))
  unknown = [name for name in tasks if name not in manager.all_tasks]
  if unknown:
    raise JaxllmError(f"unknown lm-evaluation-harness task{'s' * (len(unknown) > 1)} "
                      f"{', '.join(unknown)} (`lm_eval ls tasks` lists the catalog; a task "
                      f"of your own: a YAML file in a folder given as --include-path)")
  return manager


def _light_env_info(storage: dict) -> None:
  """What the results record of the environment, in place of lm_eval's add_env_info, whose
  torch.utils.collect_env runs pip, nvidia-smi and more in subprocesses (seconds)."""
  import importlib.metadata

  storage.update({"lm_eval_version": importlib.metadata.version("lm_eval"),
                  "jax_version": jax.__version__,
                  "jaxllm_version": importlib.metadata.version("jaxllm"),
                  "devices": [str(d) for d in jax.devices()[:8]]})


def run_tasks(lm: JaxllmLM, tasks: Sequence[str], *, include_path=None,
              num_fewshot: int | None = None, limit: float | None = None,
              log_samples: bool = False) -> dict[str, Any]:
  """lm_eval's simple_evaluate of `tasks` on `lm` (process 0), bootstrap_iters=0: the
  harness's results dict (`results`, `configs`, `n-samples`, ...)."""
  tasks = [t.strip() for t in tasks if t.strip()]
  if not tasks:
    raise JaxllmError("--tasks names no task (give one or more, comma-separated)")
  manager = task_manager(tasks, include_path)
  original = lm_evaluator.add_env_info
  lm_evaluator.add_env_info = _light_env_info
  try:
    results = lm_evaluator.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
        batch_size=lm.batch_size_per_call, bootstrap_iters=0, task_manager=manager,
        log_samples=log_samples, torch_random_seed=None, verbosity="WARNING")
  finally:
    lm_evaluator.add_env_info = original
  return results


def write_results(results: dict[str, Any], out: str | pathlib.Path) -> pathlib.Path:
  """The results as lm_eval's own CLI writes them (JSON, non-serializable values as text)."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2, default=lm_utils.handle_non_serializable,
                            ensure_ascii=False) + "\n")
  return out


def evaluate(workdir: str | pathlib.Path, tasks: Sequence[str], *, include_path=None,
             num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
             overrides: Sequence[str] = (), progress: bool = False
             ) -> tuple[dict[str, Any] | None, pathlib.Path | None]:
  """`jaxllm eval --tasks`: the harness on the run, its results written to
  workdir/lm_eval/results.json. Every process calls it; process 0 runs the harness and gets
  (results, path), the others serve its batches and get (None, None)."""
  multihost.initialize()  # a multi-process job (`jaxllm launch`), before any device is touched
  lm = load(workdir, overrides, batch_size=batch_size, progress=progress)
  if not multihost.is_main():
    lm.devices.serve()
    return None, None
  try:
    results = run_tasks(lm, tasks, include_path=include_path, num_fewshot=num_fewshot,
                        limit=limit)
  finally:
    lm.devices.stop()
  results["config"]["compiled_shapes"] = sorted(map(list, lm.devices.shapes))
  return results, write_results(results, pathlib.Path(workdir) / "lm_eval" / "results.json")


def main(args, overrides: Sequence[str]) -> None:
  """`jaxllm eval --tasks` (its arguments parsed in jaxllm/cli/commands.py): the table and
  where the results went, printed by process 0."""
  limit = args.limit
  if limit is not None and limit >= 1:
    if limit != int(limit):
      raise JaxllmError(f"--limit {limit}: a number of documents (whole) or a fraction below 1")
    limit = int(limit)
  results, path = evaluate(
      args.workdir, args.tasks.split(","), include_path=args.include_path,
      num_fewshot=args.num_fewshot, limit=limit, batch_size=args.batch_size,
      overrides=overrides, progress=not args.no_progress)
  if results is not None:  # process 0
    print(table(results))
    print(f"results in {path}")


def table(results: dict[str, Any]) -> str:
  """The harness's Markdown table of the results (and of the groups', if any)."""
  text = lm_utils.make_table(results)
  if results.get("groups"):
    text += "\n" + lm_utils.make_table(results, "groups")
  return text

