"""A config file for --config that is a workdir's saved config.json: `--config
cnnjax/saved_config.py:WORKDIR`. run.py passes it itself when --mode=eval or predict get
no --config, so that they (and their --config.* overrides) take the config the run was
trained with, and a workdir without one is said in one place.
"""
from cnnjax import workdir as workdir_lib


def get_config(workdir):
  return workdir_lib.require_saved_config(workdir)
