"""Recipe G step for step: cnnjax's training against benchmarks/torch_recipe_g.py's.

    python benchmarks/recipe_g_equivalence.py [--steps 20] [--batch 64] [--examples 256]

Both sides start from the same weights (cnnjax's initial state, its whitening fitted
from the first `--examples` train images, copied into the PyTorch network) and train
on the same batches: the first `--examples` train images in order, `--batch` a step,
with the augmentations that draw random numbers switched off on both sides (each
side's own generator draws them; their sequences are tested on their own). Everything
else is Recipe G's: the network, batch norm, label smoothing, the two-group Nesterov
SGD with coupled weight decay, the triangular schedule over `--steps`, lookahead every
5 steps and at the last, and the whitening bias frozen after 3 epochs (of
examples / batch steps each). Prints both sides' gradients at the initial weights on
the first batch (the same function), each step's training cross-entropy on both sides,
then each parameter's and batch-norm statistic's largest difference relative to its
largest value, and the test logits' (TTA level 2) on 200 images.

float32 on both sides, so they differ by summation order, which training amplifies
(the batch-norm biases take 64x the rate); `--lr_scale 0.01` runs both at a hundredth
of the rate (and decay), where the amplification is small and the schedule, the
lookahead and the freeze are compared all the same.
"""
import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

import torch_recipe_g as ref  # noqa: E402
from cnnjax import augment, data, parallel, state as state_lib, train as train_lib  # noqa: E402
from configs import cifar_fast  # noqa: E402


def cnnjax_config(args):
  c = cifar_fast.get_config()
  c.train_split, c.eval_split = f'train[:{args.examples}]', 'test[:200]'
  c.batch_size, c.num_train_steps = args.batch, args.steps
  # The config states airbench's rates for its batch of 1,024 as rates of the batch-mean
  # loss; the reference's are of the summed loss, whatever the batch: rescale to match.
  scale = args.batch / cifar_fast.AIRBENCH94['batch_size']
  c.learning_rate *= scale * args.lr_scale
  c.weight_loss = {k: v / scale for k, v in c.weight_loss.items()}
  c.whiten.images = args.examples
  c.augment.flip = c.augment.alternating_flip = False
  c.augment.translate = 0
  return c


LAYERS = {'whiten': '0', 'head': '7'}  # cnnjax's layer names -> the torch network's
for _g in (1, 2, 3):
  LAYERS.update({f'group{_g}_conv1': f'{1 + _g}.0', f'group{_g}_norm1': f'{1 + _g}.2',
                 f'group{_g}_conv2': f'{1 + _g}.4', f'group{_g}_norm2': f'{1 + _g}.5'})
TORCH_NAMES = {'kernel': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def torch_key(layer, leaf):
  return f'{LAYERS[layer]}.{TORCH_NAMES[leaf]}'


def cnnjax_layout(t):
  """A torch tensor (OIHW kernel, (out, in) matrix, vector) in cnnjax's layout (HWIO,
  (in, out), vector)."""
  t = t.detach().numpy()
  return t.transpose(2, 3, 1, 0) if t.ndim == 4 else t.T if t.ndim == 2 else t


def torch_layout(v):
  """cnnjax_layout's inverse, for a cnnjax array."""
  v = np.asarray(v)
  return v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T if v.ndim == 2 else v


def to_torch(params, batch_stats, model):
  """cnnjax's parameters and batch-norm statistics into the PyTorch network."""
  tensors = model.state_dict()  # shares storage with the model
  with torch.no_grad():
    for table in (params, batch_stats):
      for layer, leaves in table.items():
        for leaf, v in leaves.items():
          tensors[torch_key(layer, leaf)].copy_(torch.tensor(torch_layout(v)))


def relative_differences(ours, torch_tensors):
  """{leaf path: largest |cnnjax - torch| / largest |cnnjax|} over a {layer: {leaf}} tree."""
  return {f'{layer}/{leaf}': float(np.abs(v - cnnjax_layout(
              torch_tensors[torch_key(layer, leaf)])).max()
                                   / max(np.abs(v).max(), 1e-30))
          for layer, leaves in ours.items() for leaf, v in leaves.items()}


def gradient_check(run, c, model, images, labels):
  """Both sides' gradient of the batch's summed cross-entropy at the same (initial)
  weights: the same function, before any step can amplify float rounding."""
  x = augment.preprocess(None, jnp.asarray(images), c.augment, train=False)
  ce = lambda p: train_lib.loss_fn(p, run.state, x, jnp.asarray(labels), (), 'all',
                                   jax.random.PRNGKey(0), c.label_smoothing)[0]
  ours = jax.tree.map(lambda g: np.asarray(g) * len(labels), jax.grad(ce)(run.state.params))
  ref.loss_function()(model(ref.to_tensor(images, 'cpu')), torch.as_tensor(labels).long()).backward()
  grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
  del ours['whiten']['kernel']  # frozen: torch computes no gradient for it
  diffs = relative_differences(ours, grads)
  model.zero_grad(set_to_none=True)
  print(' gradients at the initial weights, first batch: largest |cnnjax - torch| / largest')
  print('  ' + ', '.join(f'{k} {v:.1e}' for k, v in diffs.items()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--examples', type=int, default=256)
  parser.add_argument('--lr_scale', type=float, default=1.0)
  args = parser.parse_args()
  torch.set_num_threads(1)  # its summation order independent of the machine's cores

  c = cnnjax_config(args)
  source = data.info(c.dataset, download=False)
  train = source.load(c.train_split)
  test = source.load(c.eval_split)
  run = state_lib.build(c, state_lib.DataSpec.of(source, c.train_split), parallel.make_mesh(),
                        fit_images=train.images[:c.whiten.images])
  steps_per_epoch = run.steps_per_epoch
  order = np.arange(args.steps) % steps_per_epoch
  images = np.stack([train.images[i * args.batch:(i + 1) * args.batch] for i in order])
  labels = np.stack([train.labels[i * args.batch:(i + 1) * args.batch] for i in order])

  model = ref.make_net()
  to_torch(run.state.params, run.state.batch_stats, model)
  model = model.to(memory_format=torch.channels_last)
  gradient_check(run, c, model, images[0], labels[0])
  slow = {k: v.clone() for k, v in model.state_dict().items()}
  opt, schedule = ref.optimizer(model, args.steps, lr_scale=args.lr_scale)
  loss_fn = ref.loss_function()
  torch_ce = []
  for step in range(args.steps):
    x = ref.to_tensor(images[step], 'cpu')
    y = torch.as_tensor(labels[step]).long()
    loss = ref.train_step(model, model, opt, schedule, loss_fn, slow, x, y, step, args.steps,
                          step // steps_per_epoch)
    torch_ce.append(float(loss.detach()) / args.batch)

  fetch = lambda d, i: {'image': d['image'][i], 'label': d['label'][i]}
  steps = run.train_steps(fetch)
  final, metrics = steps(run.state, jnp.arange(args.steps),
                         {'image': jnp.asarray(images), 'label': jnp.asarray(labels)})
  jax_ce = np.asarray(metrics['cross_entropy'])

  print(f'Recipe G, {args.steps} steps of {args.batch} on {c.train_split} '
        f'({steps_per_epoch} a epoch), rate x {args.lr_scale}; cross-entropy a step:')
  print(' step   cnnjax    torch    |diff|')
  for i, (a, b) in enumerate(zip(jax_ce, torch_ce)):
    print(f' {i:4d}  {a:.5f}  {b:.5f}  {abs(a - b):.1e}')
  ours = jax.tree.map(np.asarray, {'params': final.params, 'batch_stats': final.batch_stats})
  flat = model.state_dict()
  print(' after training, largest |cnnjax - torch| / largest |cnnjax|, per leaf:')
  worst = 0.0
  for kind, table in ours.items():
    for leaf, rel in relative_differences(table, flat).items():
      worst = max(worst, rel)
      print(f'  {kind}/{leaf}: {rel:.1e}')
  logits = np.asarray(train_lib.eval_logits(final, jnp.asarray(test.images),
                                            augment_cfg=c.augment))
  model.eval()
  t_logits = ref.tta_logits(model, ref.to_tensor(test.images, 'cpu'), c.augment.tta).numpy()
  rel = np.abs(logits - t_logits).max() / np.abs(logits).max()
  agree = (logits.argmax(1) == t_logits.argmax(1)).mean()
  print(f' test logits (TTA {c.augment.tta}): largest difference {rel:.1e} of the largest; '
        f'the same class for {agree:.1%} of {len(logits)} images')
  print(f'largest relative difference of any leaf: {worst:.1e}')


if __name__ == '__main__':
  main()
