"""Checkpoints in the workdir through an orbax CheckpointManager.

The saved state is the whole TrainState (params, optimizer state, step, base
PRNG key); the input position is a function of the step (data.train_batch), so
restoring the state restores the whole run.
"""
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpoints:

  def __init__(self, workdir, keep):
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(keep),
        cleanup_tmp_directories=True,  # remove what an interrupted save left
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state):
    """Starts an asynchronous save; training continues while it writes."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

  def restore(self, step, like):
    """The state saved at `step`, placed with the shardings of `like`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored['state']

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
