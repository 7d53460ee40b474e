"""Progress bars that suit where they are written: tqdm's on a terminal or in a notebook,
plain lines in a file or a pipe (CI, SLURM and nohup logs), where each carriage-return redraw
of a bar would be kept, a few a second, as one endless line.

    JAXLLM_PROGRESS_SECONDS   seconds between two lines in a file or pipe (default 30)
"""

from __future__ import annotations

import numbers
import os
import sys
import time
from typing import Any, Callable, Iterable

import tqdm

from jaxllm.errors import JaxllmError

DEFAULT_SECONDS = 30.0


def progress_bar(iterable: Iterable | None = None, *, file=None,
                 clock: Callable[[], float] = time.monotonic, **options) -> Any:
  """`tqdm.tqdm(iterable, file=file, **options)` where a bar can be redrawn; in a file or pipe
  a `LineProgress` with the methods the call sites use. Disabled, it is tqdm's (silent)."""
  stream = sys.stderr if file is None else file
  if options.get("disable") or _is_terminal(stream):
    return tqdm.tqdm(iterable, file=file, **options)
  if type(stream).__module__.startswith("ipykernel"):  # Jupyter: no TTY, but a widget
    from tqdm import auto
    return auto.tqdm(iterable, file=file, **options)
  return LineProgress(iterable, file=stream, seconds=seconds_between_lines(), clock=clock,
                      **options)


def _is_terminal(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed file
    return False


def seconds_between_lines() -> float:
  value = os.environ.get("JAXLLM_PROGRESS_SECONDS", "")
  try:
    return float(value) if value else DEFAULT_SECONDS
  except ValueError:
    raise JaxllmError(f"JAXLLM_PROGRESS_SECONDS={value!r} is not a number; set it to the "
                      f"seconds between progress lines in a log (default "
                      f"{DEFAULT_SECONDS:.0f})") from None


class LineProgress:
  """tqdm's counting without its drawing: `desc: n/total unit (p%) [elapsed<left, rate,
  postfix]` at most every `seconds`, and once more when closed, each a line of its own.

  Options that shape a drawn bar (dynamic_ncols, leave, position, ...) mean nothing here and
  are ignored; `delay` keeps a pass that ends sooner silent, as tqdm does.
  """

  def __init__(self, iterable: Iterable | None = None, *, file, seconds: float,
               clock: Callable[[], float], total: float | None = None, initial: float = 0,
               desc: str | None = "", unit: str = "it", unit_scale: bool = False,
               delay: float = 0.0, postfix: Any = None, disable: bool = False,
               **drawing_options):
    if total is None and hasattr(iterable, "__len__"):
      total = len(iterable)
    self.iterable, self.file, self.seconds, self.clock = iterable, file, seconds, clock
    self.total, self.n, self.initial, self.desc = total, initial, initial, desc or ""
    self.unit, self.unit_scale, self.delay = unit, unit_scale, delay
    self.postfix = ""
    if isinstance(postfix, dict):
      self.set_postfix(postfix)
    elif postfix is not None:
      self.set_postfix_str(postfix)
    self.start = self.last_line = clock()
    self.shown: float | None = None  # the n of the last line printed
    self.closed = False

  def update(self, n: float = 1) -> None:
    self.n += n
    now = self.clock()
    if now - self.last_line >= self.seconds and now - self.start >= self.delay:
      self._print(now)

  def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True,
                  **kwargs) -> None:
    """As tqdm shows it: `key=value, ...`, keyword arguments sorted, numbers shortened."""
    items = {**(ordered_dict or {}), **{key: kwargs[key] for key in sorted(kwargs)}}
    self.postfix = ", ".join(f"{key}={_postfix_text(value)}" for key, value in items.items())

  def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
    self.postfix = str(s)

  def write(self, s: str, file=None, end: str = "\n", nolock: bool = False) -> None:
    """A message of its own, on stdout unless `file` (as `tqdm.write`)."""
    print(s, end=end, file=sys.stdout if file is None else file, flush=True)

  def close(self) -> None:
    if self.closed:
      return
    self.closed = True
    now = self.clock()
    if self.shown != self.n and (self.shown is not None or now - self.start >= self.delay):
      self._print(now)

  def __enter__(self) -> "LineProgress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __iter__(self):
    try:
      for item in self.iterable:
        yield item
        self.update(1)
    finally:  # as tqdm: a loop left early closes the bar too
      self.close()

  def line(self, elapsed: float) -> str:
    """The text of one line, formatted by tqdm (its units, scaling, rate and time left)."""
    if self.total:
      counts, times = "{n_fmt}/{total_fmt} {unit} ({percentage:.0f}%)", "{elapsed}<{remaining}"
    else:
      counts, times = "{n_fmt} {unit}", "{elapsed}"
    prefix = "{desc}: " if self.desc else ""
    bar_format = prefix + counts + " [" + times + ", {rate_fmt}{postfix}]"
    return tqdm.tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=self.unit,
                                  unit_scale=self.unit_scale, postfix=self.postfix,
                                  initial=self.initial, bar_format=bar_format)

  def _print(self, now: float) -> None:
    print(self.line(now - self.start), file=self.file, flush=True)
    self.last_line, self.shown = now, self.n


def _postfix_text(value: Any) -> str:
  return tqdm.tqdm.format_num(value) if isinstance(value, numbers.Number) else str(value).strip()
