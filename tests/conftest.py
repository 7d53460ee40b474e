"""Shared fixtures, and an environment that keeps tests offline and out of the home directory.

The real data sets live outside the repository (see shared/data/README.md): tests find them
through $JAXLLM_SHARED_DATA, by default the `shared/data` folder beside the repository, and
GPT-2's BPE files through $TIKTOKEN_CACHE_DIR (default `shared/tiktoken_cache`). Without them a
test that needs them skips, saying which variable to set; under CI=true it fails instead, so a
CI without the mirror is red rather than green with skips.
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

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Set before any test module imports tiktoken or TFDS (TFDS reads TFDS_DATA_DIR at import).
os.environ.setdefault("TIKTOKEN_CACHE_DIR",
                      os.environ.get("JAXLLM_TIKTOKEN_CACHE", str(SHARED / "tiktoken_cache")))
if "TFDS_DATA_DIR" not in os.environ:  # else TFDS would write to ~/tensorflow_datasets
  os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="jaxllm-tfds-")
  atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)

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

