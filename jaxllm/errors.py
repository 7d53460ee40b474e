"""The one exception type for problems a user can fix (bad config, missing data, ...)."""


class JaxllmError(Exception):
  """A user-facing error: the CLI prints its message as one line and exits with status 2.

  The message names the problem and the fix, e.g.
  "corpus file not found: data/x.txt (set data.path to an existing text file)".
  """


class Preempted(Exception):
  """Not an error: training saved a checkpoint on a preemption notice (SIGTERM) and stopped.

  The CLI prints the message and exits with status 75; the same command resumes the run.
  """

  def __init__(self, step: int, directory, reason: str):
    super().__init__(f"preempted ({reason}) after step {step}; checkpoint saved in {directory} "
                     f"(run the same command to resume)")
    self.step = step
