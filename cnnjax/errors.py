"""The one exception type the shell turns into a one-line message and exit 2."""


class UserError(Exception):
  """Bad input from the user (config, data, workdir, files): say what, not where."""
