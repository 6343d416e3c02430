"""The exception types for problems a user can fix: one `error: ...` line, no traceback.

`main.py` prints these as a single `error: ...` line and exits with `exit_status`
(`--debug` shows the traceback too); anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake the user made and can fix (config, flags, paths); the message names the fix.
  Exit status 2, as for a command-line usage error."""
  exit_status = 2


class ResourceError(UserError):
  """The machine or the storage failed the run (no space, no permission, a path of the
  wrong kind, a workdir another run holds); the message names the path and the fix.
  Exit status 1."""
  exit_status = 1
