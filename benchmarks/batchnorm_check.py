"""Why an early Recipe F checkpoint evaluates at chance: a diagnosis, not a test.

Usage: python benchmarks/batchnorm_check.py WORKDIR [SPLIT]   (default test[:500])

For a run of a batch-norm model (configs/cifar_vgg16.py), on the same images: accuracy
in eval mode (running statistics, no dropout) and in train mode (batch statistics,
dropout), the histogram of eval-mode predictions, and per batch norm how far the running
statistics are from the batch statistics of these images in train mode (median over
channels of |running mean - batch mean| / batch std, and running var / batch var).
Result and command: docs/RESULTS.md ("Every recipe in 15 minutes").
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import augment, workdir as workdir_lib
from cnnjax.predict import Predictor


def main(workdir, split='test[:500]'):
  config = workdir_lib.load_saved_config(workdir)
  run = Predictor(workdir, config)
  state = run.state
  examples = run.source.load(split)
  labels = examples.labels
  eval_probs = run.probabilities(examples.images)  # exactly what the eval step computes
  # Train mode on the same images, evaluation-preprocessed: batch statistics and dropout.
  x = augment.preprocess(None, jnp.asarray(examples.images), config.augment, train=False)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  train_logits, updates = state.apply_fn(variables, x, train=True, mutable=['batch_stats'],
                                         rngs={'dropout': jax.random.PRNGKey(0)})
  accuracy = lambda scores: float(np.mean(np.argmax(scores, -1) == labels))
  print(f'checkpoint step {run.step}, {len(labels)} images of {split}')
  print(f'accuracy: eval mode {accuracy(eval_probs):.4f}, train mode {accuracy(train_logits):.4f}')
  print('eval-mode predictions per class:',
        np.bincount(np.argmax(eval_probs, -1), minlength=len(run.names)))
  print('batch norm: median |running mean - batch mean| / batch std, median running var / batch var')
  momentum = 0.9  # the models' batch-norm momentum: new = m * running + (1 - m) * batch
  for name, stats in state.batch_stats.items():
    new = updates['batch_stats'][name]
    batch_mean = (new['mean'] - momentum * stats['mean']) / (1 - momentum)
    batch_var = (new['var'] - momentum * stats['var']) / (1 - momentum)
    mean_gap = jnp.median(jnp.abs(stats['mean'] - batch_mean) / jnp.sqrt(batch_var + 1e-5))
    var_ratio = jnp.median(stats['var'] / (batch_var + 1e-5))
    print(f'  {name:7s} {float(mean_gap):.3f} {float(var_ratio):.3f}')


if __name__ == '__main__':
  main(*sys.argv[1:])
