"""Seeds TFDS's download cache from local copies, so catalog builders prepare offline.

  python scripts/seed_tfds_downloads.py DATA_DIR SHARED_DATA_DIR [DATASET ...]

TFDS looks for a download at `<DATA_DIR>/downloads/<dataset>/<cache name>` with a sidecar
`<cache name>.INFO` (JSON); when both are there it skips the network. Each entry of SEEDS
names that cache file, the local file to copy in, and the INFO to write beside it (the
checksum is TFDS's registered one, checked here before copying).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import sys

# dataset -> (cache file name, source file in the shared data dir, INFO json)
SEEDS: dict[str, tuple[str, str, dict]] = {
    "tiny_shakespeare": (
        "raw.gith.com_karp_char-rnn_mast_tiny_inpuhsTmqp23wELsefM53LltQrAHXha4_C6Gvwylfi3FZe0.txt",
        "tinyshakespeare.txt",
        {"dataset_names": ["tiny_shakespeare"], "original_fname": "input.txt",
         "url_info": {"checksum":
                          "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                      "filename": "input.txt", "size": 1115394},
         "urls": ["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                  "tinyshakespeare/input.txt"]},
    ),
}


def seed(data_dir: str | pathlib.Path, shared_data_dir: str | pathlib.Path,
         datasets: list[str] | None = None) -> list[pathlib.Path]:
  """Copies each dataset's source file into the TFDS download cache; returns the files."""
  seeded = []
  for name in datasets or list(SEEDS):
    if name not in SEEDS:
      raise SystemExit(f"no seed for dataset '{name}' (known: {', '.join(SEEDS)})")
    cache_name, source_name, info = SEEDS[name]
    source = pathlib.Path(shared_data_dir) / source_name
    if not source.is_file():
      raise SystemExit(f"{source} not found (pass the folder holding {source_name})")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != info["url_info"]["checksum"]:
      raise SystemExit(f"{source} has sha256 {digest}, not the {info['url_info']['checksum']} "
                       f"TFDS expects for {name}")
    target = pathlib.Path(data_dir) / "downloads" / name / cache_name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
      shutil.copyfile(source, target)
    target.with_name(cache_name + ".INFO").write_text(json.dumps(info))
    seeded.append(target)
  return seeded


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise SystemExit(__doc__)
  for path in seed(argv[0], argv[1], argv[2:] or None):
    print(f"seeded {path}")


if __name__ == "__main__":
  main(sys.argv[1:])
