"""`jaxllm preflight`'s searches and report: the largest batch that fits (`find_batch`), the
remat and scan settings that fit (`find_remat`), the printed table and the JSON
(jaxllm/tools/preflight.py compiles and measures)."""

from __future__ import annotations

import json
from typing import Any, Sequence

import ml_collections

from jaxllm.errors import JaxllmError
from jaxllm.tools.preflight import Report, Target, preflight, target
from jaxllm.training import sharding

# --- Searches -----------------------------------------------------------------------------


def with_overrides(config: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  """A copy of `config` with `section.key` values (given as section__key=value)."""
  copy = ml_collections.ConfigDict(config.to_dict())
  for name, value in values.items():
    section, key = name.split("__", 1)
    with copy[section].ignore_type():
      copy[section][key] = value
  return copy


def find_batch(config: ml_collections.ConfigDict, where: Target, log=print
               ) -> tuple[int, list[Report]]:
  """The largest train.batch_size whose train step fits (0 if none does): doubling from the
  smallest batch the mesh splits evenly, then bisecting, in steps of that batch. Gradient
  accumulation stays as configured."""
  train = config.train
  mesh = sharding.make_mesh(config.mesh, devices=list(where.devices))
  unit = sharding.data_parallel_size(mesh, sharding.logical_rules(config.mesh.rules))
  unit *= int(train.grad_accum)
  reports: list[Report] = []

  def fits(multiple: int) -> bool:
    report = preflight(with_overrides(config, train__batch_size=multiple * unit), where,
                       evaluation=False)
    reports.append(report)
    log(f"  batch {multiple * unit:>6}: " + (
        f"{_gib(report.train.peak_bytes)} {'fits' if report.fits else 'does not fit'}"
        if report.train.fits else f"does not fit: {report.train.error}"))
    return report.fits

  if not fits(1):
    return 0, reports
  low, high = 1, 2
  while fits(high):
    low, high = high, high * 2
  while high - low > 1:  # fits(low), not fits(high)
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low * unit, reports


REMAT = ("none", "dots", "full")


def find_remat(config: ml_collections.ConfigDict, where: Target, log=print) -> list[Report]:
  """The train step at the configured batch under each model.remat x model.scan_layers."""
  reports = []
  for scan in (False, True):
    for remat in REMAT:
      report = preflight(with_overrides(config, model__remat=remat, model__scan_layers=scan),
                         where, evaluation=False)
      report.overrides = {"model.remat": remat, "model.scan_layers": scan}
      reports.append(report)
      log(f"  remat {remat:<5} scan_layers {str(scan):<5}: " + (
          f"{_gib(report.train.peak_bytes)} {'fits' if report.fits else 'does not fit'}"
          if report.train.fits else f"does not fit: {report.train.error}"))
  return reports


# --- Printing -----------------------------------------------------------------------------


def _gib(n: float) -> str:
  """A size in a 12-wide column: GiB from 1 GiB, MiB below."""
  return f"{n / 2**30:8.3f} GiB" if n >= 2**30 else f"{n / 2**20:8.1f} MiB"


def table(report: Report) -> str:
  """The report as text: one row per program, then the shares and the FLOPs."""
  lines = [f"preflight: {report.target}: {report.description}",
           f"mesh {report.mesh} over {report.devices} devices; batch {report.batch_size} x "
           f"{report.length} ({report.grad_accum} microbatch(es)); {report.parameters:,} "
           f"parameters",
           f"{'program':<22} {'arguments':>12} {'outputs':>12} {'aliased':>12} "
           f"{'temporaries':>12} {'peak':>12}  of {_gib(report.memory_bytes).strip()}"]
  for p in report.programs:
    if not p.fits:
      lines.append(f"{p.name:<22} does not fit: {p.error}")
      continue
    verdict = "fits" if p.peak_bytes <= report.memory_bytes else "DOES NOT FIT"
    lines.append(f"{p.name:<22} {_gib(p.argument_bytes)} {_gib(p.output_bytes)} "
                 f"{_gib(p.alias_bytes)} {_gib(p.temp_bytes)} {_gib(p.peak_bytes)}  {verdict} "
                 f"({p.peak_bytes / report.memory_bytes:.0%}; compiled in "
                 f"{p.compile_seconds:.1f} s)")
  train = report.train
  lines.append(f"per device: parameters {_gib(report.params_bytes).strip()}, optimizer state "
               f"{_gib(report.opt_state_bytes).strip()}, batch "
               f"{_gib(report.batch_bytes).strip()}, activations and other temporaries "
               f"{_gib(train.temp_bytes).strip()}")
  if train.fits:
    flops = f"FLOPs per step and device: {report.model_flops / 1e12:.3f} T by 6N + 12 L d T"
    if report.compiled_flops is not None:
      flops += (f", {report.compiled_flops / 1e12:.3f} T by the compiler "
                f"({report.compiled_flops / report.model_flops:.2f}x)")
    else:
      flops += " (the compiler counts one layer of a scanned stack: not compared)"
    lines.append(flops)
    if report.peak_flops:
      seconds = report.model_flops / report.peak_flops
      lines.append(f"at the chip's peak a step takes at least {seconds * 1e3:.3g} ms; at 40% "
                   f"MFU {seconds / 0.4 * 1e3:.3g} ms, "
                   f"{report.tokens / report.devices / (seconds / 0.4):,.0f} tokens/s a device")
    if train.collectives:
      lines.append("collectives (train step): " + ", ".join(
          f"{kind} x{count} ({size / 2**20:.1f} MiB)"
          for kind, (count, size) in sorted(train.collectives.items())))
  lines.append("fits" if report.fits else "does not fit")
  return "\n".join(lines)


def write_json(path: str, payload: Any) -> None:
  text = json.dumps(payload, indent=2, default=float) + "\n"
  if path == "-":
    print(text, end="")
  else:
    with open(path, "w") as f:
      f.write(text)


def main(config: ml_collections.ConfigDict, topology: str, *, slices: int = 1,
         memory_gib: float | None = None, find: str = "", json_path: str = "",
         decode_slots: int = 8, overrides: Sequence[str] = ()) -> int:
  """`jaxllm preflight`: prints the report (or the search); 0 if it fits, 1 if not."""
  where = target(topology, slices, memory_gib)
  if find == "batch":
    print(f"preflight: the largest train.batch_size for {where.name} ({where.description})")
    batch, reports = find_batch(config, where)
    if batch:
      print(f"largest batch that fits: train.batch_size={batch}")
    else:
      print("no batch fits: even the smallest does not (try --find remat, a wider mesh.fsdp, "
            "or a larger topology)")
    if json_path:
      write_json(json_path, {"largest_batch_size": batch,
                             "tried": [r.to_json() for r in reports]})
    return 0 if batch else 1
  if find == "remat":
    print(f"preflight: model.remat x model.scan_layers at train.batch_size="
          f"{config.train.batch_size} on {where.name} ({where.description})")
    reports = find_remat(config, where)
    fitting = [r.overrides for r in reports if r.fits]
    print("fit: " + ("; ".join(", ".join(f"{k}={v}" for k, v in o.items()) for o in fitting)
                     if fitting else "none"))
    if json_path:
      write_json(json_path, {"fits": fitting, "tried": [r.to_json() for r in reports]})
    return 0 if fitting else 1
  if find:
    raise JaxllmError(f"--find must be batch or remat, got '{find}'")
  report = preflight(config, where, decode_slots=decode_slots)
  report.overrides = dict(o.split("=", 1) for o in overrides)
  print(table(report))
  if json_path:
    write_json(json_path, report.to_json())
  return 0 if report.fits else 1
