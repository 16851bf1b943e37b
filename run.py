"""cnnjax command line: python run.py --config configs/cifar_lrn.py --workdir DIR.

Every config field can be overridden (--config.batch_size=256). Re-running with
the same --workdir resumes from its latest checkpoint. Bad input ends with one
line on stderr and exit status 2.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data is used for reading only

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and outputs.')


def fail(message):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as e:
    # absl and ml_collections report unknown fields, bad values and missing
    # config files as exceptions; the first line says what is wrong.
    fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    fail('--config is required (e.g. --config configs/cifar_lrn.py)')
  if not _WORKDIR.value:
    fail('--workdir is required')
  logging.set_verbosity(logging.ERROR)  # TFDS/orbax info chatter; our output is print()
  from cnnjax import loop
  from cnnjax.errors import UserError
  try:
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
