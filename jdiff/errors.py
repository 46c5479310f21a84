"""Errors that are the user's to fix, not bugs: the command-line entry points print their
message as one line (`error: ...`) and exit with status 2 (jdiff.cli.run); anything else
keeps its traceback. Library callers catch them like the built-in types they extend."""


class UserError(Exception):
  """A request jdiff cannot carry out as asked: a bad value, a missing file, a busy workdir."""


class InvalidArgument(UserError, ValueError):
  """A config field or flag with a value jdiff cannot use; the message names it."""


class NotFound(UserError, FileNotFoundError):
  """A path the request names (a workdir, a dataset, a checkpoint) that is not there."""
