"""Progress bars: tqdm on a terminal; in a file or pipe, plain lines at an interval."""

import io

import pytest
import tqdm

from jaxllm import progress
from jaxllm.errors import JaxllmError


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now


class Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def test_a_log_gets_a_line_per_interval_and_one_at_the_end(monkeypatch, capsys):
  monkeypatch.setenv("JAXLLM_PROGRESS_SECONDS", "10")
  log, clock = io.StringIO(), FakeClock()
  with progress.progress_bar(total=100, initial=20, desc="lm", unit="step", file=log,
                             clock=clock, dynamic_ncols=True) as bar:
    for second in range(1, 21):  # 4 steps a second, a line every 10 s
      clock.now += 1
      bar.set_postfix(loss=f"{5 - second / 10:.4f}", mfu=0.25)
      bar.update(4)
      if second == 10:
        assert log.getvalue().count("\n") == 1
      if second in (9, 19):
        bar.write("step: an evaluation")  # stdout, not the log
  assert capsys.readouterr().out == "step: an evaluation\n" * 2
  assert "\r" not in log.getvalue()
  assert log.getvalue().splitlines() == [
      "lm: 60/100 step (60%) [00:10<00:10,  4.00step/s, loss=4.0000, mfu=0.25]",
      "lm: 100/100 step (100%) [00:20<00:00,  4.00step/s, loss=3.0000, mfu=0.25]"]


def test_the_end_is_a_line_of_its_own_between_intervals(monkeypatch):
  monkeypatch.setenv("JAXLLM_PROGRESS_SECONDS", "30")
  log, clock = io.StringIO(), FakeClock()
  for _ in progress.progress_bar(range(7), desc="judge", unit="response", file=log,
                                 clock=clock):
    clock.now += 2
  # A byte count of unknown total, as corpus.survey reads a stream.
  with progress.progress_bar(desc="reading", unit="char", unit_scale=True, file=log,
                             clock=clock) as bar:
    clock.now += 40
    bar.update(2_500_000)
    clock.now += 5
    bar.update(500_000)
  assert log.getvalue().splitlines() == [
      "judge: 7/7 response (100%) [00:14<00:00,  2.00s/response]",
      "reading: 2.50M char [00:40, 62.5kchar/s]",
      "reading: 3.00M char [00:45, 66.7kchar/s]"]


def test_a_pass_within_its_delay_prints_nothing():
  log, clock = io.StringIO(), FakeClock()
  with progress.progress_bar(desc="reading", delay=2, file=log, clock=clock) as bar:
    clock.now += 1
    bar.update(10)
  with progress.progress_bar(total=3, desc="generate", disable=True, file=log) as bar:
    bar.update(3)
  assert log.getvalue() == ""


def test_a_terminal_gets_tqdm():
  terminal = Terminal()
  bar = progress.progress_bar(total=3, desc="lm", unit="step", file=terminal)
  assert isinstance(bar, tqdm.tqdm)
  bar.update(3)
  bar.close()
  assert "\r" in terminal.getvalue()


def test_a_bad_interval_is_a_one_line_error(monkeypatch):
  monkeypatch.setenv("JAXLLM_PROGRESS_SECONDS", "half a minute")
  with pytest.raises(JaxllmError, match="JAXLLM_PROGRESS_SECONDS='half a minute' is not a "
                                        "number"):
    progress.progress_bar(total=3, file=io.StringIO())
