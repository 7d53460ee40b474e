"""Shared fixtures, and an environment that keeps tests offline and out of the home directory.

The real data sets live outside the repository (see shared/data/README.md): tests find them
through $JAXLLM_SHARED_DATA, by default the `shared/data` folder beside the repository, and
GPT-2's BPE files through $TIKTOKEN_CACHE_DIR (default `shared/tiktoken_cache`). Without them a
test that needs them skips, saying which variable to set; under CI=true it fails instead, so a
CI without the mirror is red rather than green with skips.

`pytest -m "not slow"` is the fast tier for the edit-test loop: SLOW below lists the tests
left out of it.
"""

from __future__ import annotations

import atexit
import http.server
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
import threading
import types
import warnings

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Set before any test module imports tiktoken or TFDS (TFDS reads TFDS_DATA_DIR at import).
os.environ.setdefault("TIKTOKEN_CACHE_DIR",
                      os.environ.get("JAXLLM_TIKTOKEN_CACHE", str(SHARED / "tiktoken_cache")))
if "TFDS_DATA_DIR" not in os.environ:  # else TFDS would write to ~/tensorflow_datasets
  os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="jaxllm-tfds-")
  atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)

# `datasets` (lm_eval loads a task's JSON through it) reads these when first imported: local
# files only, its cache out of the home directory.
os.environ["HF_DATASETS_OFFLINE"] = "1"
if "HF_DATASETS_CACHE" not in os.environ:
  os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="jaxllm-hf-datasets-")
  atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
if "JAXLLM_COMPILATION_CACHE" not in os.environ:  # else ~/.cache/jaxllm/xla
  os.environ["JAXLLM_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="jaxllm-xla-")
  atexit.register(shutil.rmtree, os.environ["JAXLLM_COMPILATION_CACHE"], ignore_errors=True)


# CI runs every test: there a missing mirror is a failure, not a skip.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _needs_mirror(reason: str):
  """Skips the running test for want of the offline mirror (fails it under CI=true)."""
  if IN_CI:
    pytest.fail(f"{reason} [CI=true: a missing mirror fails]", pytrace=False)
  pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The folder holding tinyshakespeare.txt, the-verdict.txt, ..."""
  path = pathlib.Path(os.environ.get("JAXLLM_SHARED_DATA", SHARED / "data"))
  if not (path / "tinyshakespeare.txt").is_file():
    _needs_mirror(f"shared data not found in {path} (set JAXLLM_SHARED_DATA to the folder "
                  f"holding tinyshakespeare.txt and the-verdict.txt)")
  return path


@pytest.fixture(scope="session", autouse=True)
def _bpe_files_or_skip():
  """A test whose tiktoken encoding is neither in TIKTOKEN_CACHE_DIR nor downloadable skips.

  tiktoken downloads a BPE file only when its cache lacks it; that download is what fails
  offline, so patching it skips exactly the tests that need a missing file, wherever the
  tokenizer is built (a subprocess still fails, with jaxllm's message naming the variable).
  """
  import tiktoken.load

  download = tiktoken.load.read_file

  def read_file(blobpath):
    try:
      return download(blobpath)
    except Exception as e:  # requests' connection errors, HTTP errors
      if not blobpath.startswith(("http://", "https://")):
        raise
      _needs_mirror(f"{blobpath.rsplit('/', 1)[-1]} is not in TIKTOKEN_CACHE_DIR="
                    f"{os.environ.get('TIKTOKEN_CACHE_DIR')} and cannot be downloaded "
                    f"({type(e).__name__}); set TIKTOKEN_CACHE_DIR to the mirror's tiktoken_cache")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tiktoken.load, "read_file", read_file)
    yield


@pytest.fixture(scope="session")
def seeded_tfds_dir(shared_data, tmp_path_factory) -> pathlib.Path:
  """A TFDS data dir whose download cache holds tiny_shakespeare, so it prepares offline."""
  spec = importlib.util.spec_from_file_location(
      "seed_tfds_downloads", REPO / "scripts" / "seed_tfds_downloads.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data_dir = tmp_path_factory.mktemp("tfds")
  module.seed(data_dir, shared_data, ["tiny_shakespeare"])
  return data_dir


class _ChatHandler(http.server.BaseHTTPRequestHandler):
  """An OpenAI-compatible chat endpoint (as Ollama and vLLM serve it) with scripted replies."""

  requests: list = []
  replies: list = []

  def do_POST(self):  # noqa: N802 (http.server's name)
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    self.requests.append((self.path, body))
    reply = self.replies[(len(self.requests) - 1) % len(self.replies)]
    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.end_headers()
    self.wfile.write(payload.encode())

  def log_message(self, *args):
    pass


@pytest.fixture
def judge_server():
  """A real HTTP server on 127.0.0.1 in a thread: `.url`, `.requests` ((path, JSON body) of
  each POST), `.replies` (answered in turn)."""
  handler = type("Handler", (_ChatHandler,), {
      "requests": [], "replies": ["Score: 85", "I would rate it 40 out of 100.", "no idea"]})
  server = http.server.HTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield types.SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}",
                              requests=handler.requests, replies=handler.replies)
  server.shutdown()
  server.server_close()


# The fast tier leaves these out: `pytest -m "not slow"`. Seconds from `pytest --durations=0`
# on a 2-core CPU shared with other work (load ~7; setup + call; a module fixture's setup is
# charged to its first user, so a fixture's users are listed together): every test of 8 s or
# more, then the slowest of the fast tier's own runs (load ~2) until it took under 3 minutes.
# An entry is a node id, a test function (all its parameters) or a file.
SLOW = {
    # The `runs` fixture: jaxllm train on 4 devices, on 2 processes of 2, and the 8-device
    # helper in two parts, 55 s in all (load ~2, after test_launch.py filled the compilation
    # cache).
    "tests/test_sharding.py::test_every_mesh_gives_the_same_losses",
    "tests/test_sharding.py::test_the_mesh_check_sees_a_1e_3_change",
    "tests/test_sharding.py::test_bf16_matmuls_give_the_same_losses_on_every_mesh",
    "tests/test_sharding.py::test_llama_components_give_the_same_losses_on_every_mesh",
    "tests/test_sharding.py::test_encoder_gives_the_same_losses_on_every_mesh",
    "tests/test_sharding.py::test_fsdp_divides_parameter_and_optimizer_bytes",
    "tests/test_sharding.py::test_tensor_parallel_splits_heads_and_mlp_as_the_rules_say",
    "tests/test_sharding.py::test_remat_keeps_losses_and_cuts_step_memory",
    "tests/test_sharding.py::test_errors_name_both_numbers",
    "tests/test_sharding.py::test_two_processes_train_as_one_with_four_devices",
    # The `converted` fixture's users, subprocesses on meshes.
    "tests/test_trainer.py::test_finetuning_gives_the_same_losses_on_every_mesh",  # 47 (load ~3)
    "tests/test_trainer.py::test_lora_adapters_split_like_their_kernels",  # 31 (load ~3)
    "tests/test_trainer.py::test_two_processes_end_with_the_one_process_figures",  # 44 (load ~3)
    "tests/test_trainer.py::test_a_resumed_finetune_reads_no_init_from_weights",  # 36 (load ~3)
    "tests/test_trainer.py::test_finetune_resumes_exactly_after_sigkill_and_sigterm",  # 42 (~3)
    "tests/test_trainer.py::test_gradient_accumulation_gives_the_whole_batch_gradient",  # 71 (5)
    "tests/test_dpo.py::test_instruct_then_dpo_then_eval",  # 49 (load ~2)
    "tests/test_dpo.py::test_loss_is_ln2_when_the_policy_is_the_reference",  # 53
    "tests/test_matmul.py::test_shakespeare_100_steps_track_float32",  # 35 (load ~3)
    "tests/test_matmul.py::test_gpt2_small_shapes_train_like_float32",  # 92
    "tests/test_sweep.py::test_grid_killed_midway_finishes_only_what_is_missing",  # 38 (~3)
    "tests/test_sweep.py::test_tpe_with_median_pruning_prunes",  # 32 (load ~3)
    "tests/test_sweep.py::test_two_workers_share_one_study",  # 24 (load ~3)
    "tests/test_vectorized.py::test_eight_trials_at_once_equal_eight_runs",  # 47 (load ~3)
    "tests/test_vectorized.py::test_trials_of_other_seeds_and_init_scales_equal_their_runs",  # 74
    "tests/test_vectorized.py::test_a_vectorised_grid_sweep",  # 64
    "tests/test_launch.py::test_local_two_processes_equal_one",  # 27 (load ~2)
    "tests/test_finetune.py::test_classifier_then_instructions_end_to_end",  # 29 (load ~2)
    "tests/test_finetune.py::test_how_the_network_runs_is_this_runs_under_init_from",  # 19 (~2)
    "tests/test_generate.py::test_generation_past_the_context_slides_a_window",  # 55
    "tests/test_generate.py::test_padded_vocabulary_ids_are_never_sampled",  # 53
    "tests/test_generate.py::test_rows_stop_at_eot_and_emit_nothing_after",  # 12
    "tests/test_convert.py::test_logits_match_transformers",  # 54
    "tests/test_convert.py::test_export_then_import_round_trip",  # 45
    "tests/test_convert.py::test_every_gpt2_size_maps_onto_its_preset",  # 32 (4)
    "tests/test_convert.py::test_both_formats_import_to_the_same_params",  # 9
    "tests/test_llama_weights.py::test_a_converted_llama_generates_and_trains_like_a_gpt2_run",  # 48
    "tests/test_llama_weights.py::test_weights_in_and_out_match_transformers",  # 23 (3)
    "tests/test_llama_weights.py::test_sharded_checkpoint_with_an_index",  # 9
    "tests/test_llama_weights.py::test_cached_greedy_decoding_equals_transformers_generate",  # 8
    "tests/test_lora.py::test_merged_weights_give_the_logits_of_adapters_on_the_fly",  # 48 (2)
    "tests/test_lora.py::test_merge_handles_stacked_layers_and_rejects_bad_targets",  # 10
    "tests/test_lora.py::test_only_adapters_train",  # 8
    "tests/test_train.py::test_gradient_accumulation_matches_one_big_batch",  # 34
    "tests/test_train.py::test_eval_step_weighs_tokens",  # 22
    "tests/test_train.py::test_train_step_is_deterministic",  # 19
    "tests/test_train.py::test_tiny_model_overfits_tiny_corpus",  # 13
    "tests/test_encoder.py::test_mlm_task_resumes_exactly_and_reports_its_baseline",  # 32
    "tests/test_encoder.py::test_masked_lm_logits_match_transformers_and_export_round_trips",  # 30
    "tests/test_encoder.py::test_padding_changes_no_real_position",  # 22
    "tests/test_encoder.py::test_masked_lm_loss_counts_selected_positions_only",  # 22
    "tests/test_encoder.py::test_convert_makes_encoder_runs_and_exports_them_back",  # 8
    "tests/test_encoder.py::test_one_line_errors",  # 8
    "tests/test_cli.py::test_a_second_run_loads_its_compiled_programs_from_the_cache",  # 33
    # jaxllm eval --tasks in this process, then as a job of two processes.
    "tests/test_harness.py::test_jaxllm_eval_runs_local_tasks_and_writes_their_results",  # 14
    "tests/test_harness_hf.py",  # lm_eval's hf model beside jaxllm's, 2 models: 333 s (load ~6)
    # jaxllm preflight: steps compiled for a TPU topology or simulated CPU devices (load ~3).
    "tests/test_preflight.py::test_memory_grows_with_the_batch_and_falls_with_fsdp",  # 8
    "tests/test_preflight.py::test_find_remat_compiles_every_setting_at_the_batch",  # 16
    "tests/test_preflight.py::test_an_oversized_batch_does_not_fit_and_exits_non_zero",  # 7
    "tests/test_preflight.py::test_find_batch_returns_the_largest_that_fits",  # 7
    "tests/test_cli.py::test_train_then_generate",  # 22
    "tests/test_api.py::test_convert_load_generate_and_train",  # 19 (load ~4)
    # The `compile_cache` fixture's users, jaxllm train in subprocesses.
    "tests/test_checkpoint.py::test_resume_after_sigkill_and_sigterm_is_exact",  # 31
    "tests/test_checkpoint.py::test_restore_onto_another_mesh",  # 9
    "tests/test_model.py::test_llama_cache_holds_kv_heads_and_decodes_like_the_full_forward",  # 12
    "tests/test_model.py::test_llama_options_build_the_named_parameters",  # 11
    "tests/test_heads.py::test_classifier_reads_the_last_real_token_whatever_the_padding",  # 10
    "tests/test_instruction.py::test_masked_positions_contribute_exactly_zero_gradient",  # 10
    "tests/test_reproduce.py::test_all_cpu_experiments_in_dependency_order",  # 9
    # Measured in the fast tier itself (load ~3), where a module's first test pays its start.
    "tests/test_encoder.py::test_classifier_and_bare_model_match_transformers_and_round_trip",  # 23
    "tests/test_dpo.py::test_masked_prompt_tokens_change_no_gradient",  # 19
    "tests/test_evaluate.py::test_the_classifier_step_sums_the_confusion_matrix_of_its_real_rows",  # 15
    "tests/test_evaluate.py::test_responses_in_the_books_format",  # 9
    "tests/test_generate.py::test_batched_equals_one_at_a_time",  # 11
    "tests/test_generate.py::test_cached_sampling_equals_uncached",  # 6
    "tests/test_generate.py::test_forced_eot_stops_every_row_at_once",  # 5
    "tests/test_checkpoint.py::test_save_policy_and_keep",  # 10
    "tests/test_instruction.py::test_instruction_losses_go_through_the_models_own_lm_head",  # 8
    "tests/test_model.py::test_bfloat16_compute",  # 7
    "tests/test_model.py::test_scanned_model_decodes_with_a_cache",  # 6
    "tests/test_model.py::test_scanned_model_generates_the_unscanned_tokens",  # 6
    "tests/test_reproduce.py::test_reproduce_trains_then_reads_the_finished_run",  # 7
    "tests/test_convert.py::test_missing_and_broken_files_are_one_line_errors",  # 5
    "tests/test_cli.py::test_zero_intervals_mean_only_at_the_ends",  # 13
    "tests/test_checkpoint.py::test_mismatched_checkpoint_is_one_line_error",  # 9
    "tests/test_evaluate.py::test_perplexity_of_a_uniform_model_is_the_vocabulary_size",  # 8
    "tests/test_finetune.py::test_trainable_groups_select_what_the_book_trains",  # 7
    "tests/test_generate.py::test_repeated_calls_do_not_recompile",  # 3
    "tests/test_metrics.py::test_event_files_without_importing_torch",  # 3
    "tests/test_data.py::test_tiny_shakespeare_splits_join_back_to_the_file",  # 3
    "tests/test_multihost.py::test_a_failure_on_process_0_stops_the_others_with_its_message",  # 3
    "tests/test_multihost.py::test_the_others_read_what_process_0_prepared_and_all_agree",  # 6
    "tests/test_finetune.py::test_a_frozen_backbone_stays_bit_identical",  # 9
    "tests/test_data.py::test_tiny_shakespeare_char_tokens",  # 5
    "tests/test_token_files.py::test_killed_preparation_continues_to_the_same_files",  # 4
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
  matched = set()
  for item in items:
    names = {item.nodeid, item.nodeid.split("[")[0], item.nodeid.split("::")[0]} & SLOW
    if names:
      item.add_marker(pytest.mark.slow)
      matched |= names
  # A renamed slow test would silently rejoin the fast tier: name the stale entries.
  files = {item.nodeid.split("::")[0] for item in items}
  stale = sorted(e for e in SLOW - matched if e.split("::")[0] in files)
  if stale and not any("::" in arg for arg in config.args):
    warnings.warn(pytest.PytestWarning(f"tests/conftest.py SLOW names tests that do not exist "
                                       f"(renamed?): {', '.join(stale)}"))
