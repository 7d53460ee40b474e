"""A TFDS builder for local text files, so a folder of .txt files reads like a catalog dataset.

One example {"text": ...} per file, in a single "train" split, written as ArrayRecord and
read back with `as_data_source` (no tf.data). The builder config's name hashes the files'
absolute paths, sizes and modification times, so editing a file prepares a fresh copy
under `<data_dir>/jaxllm_text/<config name>/` instead of reading a stale one.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib

import tensorflow_datasets as tfds

from jaxllm.errors import JaxllmError

NAME = "jaxllm_text"


def resolve_text_files(path: str) -> list[pathlib.Path]:
  """`data.path` as a sorted list of absolute files: a file, a directory's *.txt, or a glob."""
  if not path:
    raise JaxllmError("data.path is empty (with data.dataset=text, set data.path to a text "
                      "file, a directory of .txt files or a glob)")
  expanded = os.path.expanduser(path)
  candidate = pathlib.Path(expanded)
  if glob.has_magic(expanded):
    files = [pathlib.Path(p) for p in sorted(glob.glob(expanded, recursive=True))]
    files = [f for f in files if f.is_file()]
    if not files:
      raise JaxllmError(f"no files match data.path glob '{path}' (check the pattern)")
  elif candidate.is_dir():
    files = sorted(f for f in candidate.glob("*.txt") if f.is_file())
    if not files:
      raise JaxllmError(f"no .txt files in directory {path} (set data.path to a text file, "
                        f"a directory holding *.txt files or a glob)")
  elif candidate.is_file():
    files = [candidate]
  else:
    raise JaxllmError(f"corpus file not found: {path} (set data.path to an existing text "
                      f"file, directory or glob)")
  return [f.resolve() for f in files]


def files_identity(files: list[pathlib.Path]) -> list[tuple[str, int, int]]:
  """(path, size, mtime_ns) per file: what decides whether a prepared copy is still current."""
  identity = []
  for f in files:
    stat = f.stat()
    identity.append((str(f), stat.st_size, stat.st_mtime_ns))
  return identity


# repr=False keeps BuilderConfig's repr, which TFDS logs: not thousands of paths for a glob.
@dataclasses.dataclass(eq=False, repr=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  files: tuple[str, ...] = ()


def text_files_config(files: list[pathlib.Path]) -> TextFilesConfig:
  identity = files_identity(files)
  digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
  # A readable prefix (first file's stem) makes `ls <data_dir>/jaxllm_text` useful.
  stem = "".join(c if c.isalnum() else "_" for c in files[0].stem)[:32] or "text"
  return TextFilesConfig(
      name=f"{stem}_{len(files)}f_{digest}", version="1.0.0",
      description=f"{len(files)} file(s): {', '.join(str(f) for f in files[:3])}"
                  f"{', ...' if len(files) > 3 else ''}",
      files=tuple(str(f) for f in files))


class JaxllmText(tfds.core.GeneratorBasedBuilder):
  """Local UTF-8 text files: one example per file, in the order of `config.files`."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        # Files are documents in a chosen order; TFDS would otherwise shuffle them by key.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(self.builder_config.files)}

  def _generate_examples(self, files):
    for index, name in enumerate(files):
      data = pathlib.Path(name).read_bytes()
      try:
        text = data.decode("utf-8")
      except UnicodeDecodeError as e:
        raise JaxllmError(f"corpus file {name} is not UTF-8 (bad byte at offset {e.start}); "
                          f"convert it (iconv -t utf-8) or leave it out of data.path") from None
      yield index, {"text": text}


def local_builder(path: str, data_dir: str) -> JaxllmText:
  """The (not yet prepared) builder for the files `path` names."""
  files = resolve_text_files(path)
  return JaxllmText(config=text_files_config(files), data_dir=data_dir,
                    file_format="array_record")
