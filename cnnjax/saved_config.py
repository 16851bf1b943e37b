"""A config file for --config that is a workdir's saved config.json: `--config
cnnjax/saved_config.py:WORKDIR`. run.py passes it itself when --mode=eval or predict get
--config.* overrides and no --config, so that they apply to the config the run was
trained with.
"""
from cnnjax import workdir as workdir_lib


def get_config(workdir):
  config = workdir_lib.load_saved_config(workdir)
  if config is None:
    raise FileNotFoundError(f'no {workdir_lib.CONFIG_FILE} in {workdir}')
  return config
