"""Errors and exit statuses, for every module to import.

    0   done
    2   a problem the user can fix (JaxllmError: a missing file, an unknown config key, ...)
    75  preempted (EX_TEMPFAIL, "try again later"): a checkpoint was saved; the same command
        resumes. Not success (0), which would end a scheduler's job, nor failure.
"""

USAGE_EXIT_STATUS = 2
PREEMPTED_EXIT_STATUS = 75


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
