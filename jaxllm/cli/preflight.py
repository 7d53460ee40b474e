"""`jaxllm preflight`'s command line (jaxllm/tools/preflight.py does the work)."""

from __future__ import annotations


def add_parser(commands) -> None:
  parser = commands.add_parser(
      "preflight", help="will a run fit a TPU slice? its steps compiled for it, here",
      description="Compiles the run's train step (and evaluation and decode steps) ahead of "
                  "time for a Cloud TPU topology (libtpu's compile-only devices: pip install "
                  "-e '.[tpu-preflight]') and reports memory per chip, FLOPs and collectives; "
                  "exit status 1 if it does not fit.")
  parser.add_argument("--config", required=True, help="experiments/<name>.py")
  parser.add_argument("--topology", required=True,
                      help="a Cloud TPU type (v5litepod-8, v5p-32, v4-8, v6e-16), or cpu-N "
                      "for N simulated CPU devices")
  parser.add_argument("--slices", type=int, default=1,
                      help="multislice: the data axis spans the slices")
  parser.add_argument("--find", choices=("batch", "remat"),
                      help="batch: the largest train.batch_size that fits; remat: which "
                      "model.remat x model.scan_layers settings fit the batch")
  parser.add_argument("--hbm-gib", type=float,
                      help="memory per device to fit in (default: the chip's HBM; cpu-N: "
                      "this machine's RAM / N)")
  parser.add_argument("--decode-slots", type=int, default=8,
                      help="rows of the serving decode step compiled too (0: none)")
  parser.add_argument("--json", default="", help="also write the report as JSON (- : stdout)")


def main(args, overrides: list[str]) -> int:
  """Prints the report (or the search); 0 if it fits, 1 if not."""
  import jaxllm  # JAX and libtpu load here, after the command line is read
  from jaxllm.tools import preflight_report

  config = jaxllm.load_config(args.config, overrides)
  return preflight_report.main(config, args.topology, slices=args.slices, memory_gib=args.hbm_gib,
                        find=args.find or "", json_path=args.json,
                        decode_slots=args.decode_slots, overrides=overrides)
