"""The one exception type the shell turns into a one-line message and exit 2, and that
line taken from any other exception."""


class UserError(Exception):
  """Bad input from the user (config, data, workdir, files): say what, not where."""


def first_line(e):
  """An exception's first line of text, for a one-line message (its type where it has none)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def typed_line(e):
  """'Type: first line' of an exception (the type alone where it has no text), where the type
  says what the text does not: an OSError subclass, an error a user's config file raised."""
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0]}' if text else type(e).__name__
