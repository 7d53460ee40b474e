"""The one exception type for problems a user can fix (bad config, missing data, ...)."""


class JaxllmError(Exception):
  """A user-facing error: the CLI prints its message as one line and exits with status 2.

  The message names the problem and the fix, e.g.
  "corpus file not found: data/x.txt (set data.path to an existing text file)".
  """
