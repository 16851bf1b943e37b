"""Recipe G in PyTorch: airbench94's training, the reference cnnjax's Recipe G is held to.

    python benchmarks/torch_recipe_g.py [--dataset cifar10 | --dataset cifar10.npz]
        [--seeds 0,1,2] [--threads N] [--compile] [--half] [--epochs 9.9]

Written here from a reading of KellerJordan/cifar10-airbench's legacy/airbench94.py (none
of its code is copied), in PyTorch's own terms: the loss summed over the batch, SGD with
two parameter groups (the batch-norm biases at bias_scaler x the rate, each group's
coupled weight decay wd / its rate), LambdaLR on the triangular schedule, the lookahead
over the whole state_dict. The hyperparameters are configs/cifar_fast.py's AIRBENCH94
(airbench's `hyp`); cnnjax's config translates them to its own terms, and this script
is what that translation is checked against.

Data: the same uint8 arrays cnnjax trains on, through cnnjax.data (a TFDS name, read
offline from TFDS_DATA_DIR, or an arrays file written by `run.py --mode=export`: no
TensorFlow needed on a GPU machine). Per epoch a torch.randperm order, the last partial
batch dropped; flips drawn once per image and the whole set mirrored on odd epochs;
reflect-padded translations of up to 2 pixels drawn per image per epoch.

Prints per seed: the test accuracy with test-time augmentation (level 2) and without,
and the wall time of the whole run (whitening fit, training, final evaluation), then the
mean and standard deviation over the seeds. Data loading is outside the timed run, and so
is compilation: with --compile a warm-up first compiles every shape the run meets, as
airbench's warm-up run does, and prints its own time. On the CPU it runs in float32; on
a GPU --half runs the network in float16 with float32 batch norm, as airbench does, and
--compile wraps the model in torch.compile.
"""
import argparse
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnjax import data  # noqa: E402  (numpy only, TFDS when a name is given)
from configs.cifar_fast import AIRBENCH94, CIFAR_MEAN, CIFAR_STD  # noqa: E402

H = AIRBENCH94


def to_tensor(images, device):
  """uint8 N x H x W x C -> float32 N x C x H x W normalized with the CIFAR mean and std."""
  x = torch.as_tensor(images, device=device).permute(0, 3, 1, 2).float() / 255
  mean = torch.tensor(CIFAR_MEAN, device=device).view(1, -1, 1, 1)
  std = torch.tensor(CIFAR_STD, device=device).view(1, -1, 1, 1)
  return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def whitening_weight(x, size=2, eps=5e-4):
  """Conv weight (2 * C * size^2, C, size, size): the eigenvectors of the uncentred
  covariance of x's size x size patches over 1/sqrt(eigenvalue + eps), largest first,
  then negated. In float64, as cnnjax's (its smallest directions are ill-conditioned)."""
  c = x.shape[1]
  p = x.double().unfold(2, size, 1).unfold(3, size, 1)  # N, C, H', W', size, size
  p = p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * size * size)  # (C, kh, kw) order
  values, vectors = torch.linalg.eigh(p.T @ p / len(p))
  values, vectors = values.flip(0), vectors.flip(1)
  scaled = (vectors / torch.sqrt(values + eps)).T.reshape(-1, c, size, size)
  return torch.cat([scaled, -scaled]).float()


class Conv3x3(nn.Conv2d):
  """3x3 'same' conv, no bias, PyTorch's default init with identity (Dirac) filters first."""

  def __init__(self, cin, cout):
    super().__init__(cin, cout, 3, padding='same', bias=False)
    with torch.no_grad():
      nn.init.dirac_(self.weight[:cin])


def batch_norm(width):
  norm = nn.BatchNorm2d(width, eps=1e-12, momentum=1 - H['batchnorm_momentum'])
  norm.weight.requires_grad = False  # frozen at 1; the bias trains
  return norm


def group(cin, cout):
  return nn.Sequential(Conv3x3(cin, cout), nn.MaxPool2d(2), batch_norm(cout), nn.GELU(),
                       Conv3x3(cout, cout), batch_norm(cout), nn.GELU())


class Scale(nn.Module):
  def __init__(self, factor):
    super().__init__()
    self.factor = factor

  def forward(self, x):
    return x * self.factor


def make_net():
  whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
  whiten.weight.requires_grad = False
  nn.init.zeros_(whiten.bias)
  widths = (24, *H['widths'])
  return nn.Sequential(whiten, nn.GELU(),
                       *[group(a, b) for a, b in zip(widths[:-1], widths[1:])],
                       nn.MaxPool2d(3), nn.Flatten(), nn.Linear(widths[-1], 10, bias=False),
                       Scale(H['scaling_factor']))


def triangle(step, total):
  """airbench's schedule factor for `step`: 0.2 -> 1 over int(0.23 total), then -> 0.07."""
  warm = int(total * 0.23)
  if step < warm:
    return 0.2 + (1.0 - 0.2) * step / warm
  return 1.0 + (0.07 - 1.0) * (step - warm) / (total - warm)


def lookahead_decay(step, total):
  return 0.95**5 * (step / total) ** 3


def augment_batch(padded, flip_bits, odd_epoch, idx, generator, pad):
  """The batch `idx` of the reflect-padded set, mirrored where its bit (xor the epoch's
  parity) says, shifted by a per-image offset in [-pad, pad]^2."""
  x = padded[idx]
  flip = (flip_bits[idx] != odd_epoch).view(-1, 1, 1, 1)
  x = torch.where(flip, x.flip(-1), x)
  n, size = len(idx), padded.shape[-1] - 2 * pad
  dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device='cpu').to(x.device)
  dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device='cpu').to(x.device)
  ar = torch.arange(size, device=x.device)
  rows, cols = dy + ar.view(1, -1, 1), dx + ar.view(1, 1, -1)
  batch = torch.arange(n, device=x.device).view(n, 1, 1)
  out = x.permute(0, 2, 3, 1)[batch, rows, cols]  # N, size, size, C
  return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def tta_logits(model, x, level=2):
  mirrored = lambda v: 0.5 * model(v) + 0.5 * model(v.flip(-1))
  if level == 0:
    return model(x)
  if level == 1:
    return mirrored(x)
  padded = F.pad(x, (1,) * 4, mode='reflect')
  h, w = x.shape[-2:]
  shifted = (padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2])
  return 0.5 * mirrored(x) + 0.5 * (mirrored(shifted[0]) + mirrored(shifted[1])) / 2


def evaluate(model, test_x, test_y, level, batch=1000):
  model.eval()
  correct = 0
  for i in range(0, len(test_x), batch):
    logits = tta_logits(model, test_x[i:i + batch], level)
    correct += int((logits.argmax(1) == test_y[i:i + batch]).sum())
  model.train()
  return correct / len(test_x)


def optimizer(model, total, lr_scale=1.0):
  """airbench's SGD in PyTorch's terms, and its LambdaLR schedule over `total` steps: two
  groups, the batch-norm biases at bias_scaler x the rate, each with coupled weight decay
  wd / its rate (so each group decays by wd a step, whatever its rate); Nesterov.
  lr_scale scales both rates, and so the decay (benchmarks/recipe_g_equivalence.py)."""
  batch, momentum = H['batch_size'], H['momentum']
  kilostep = 1024 * (1 + 1 / (1 - momentum))
  lr, wd = lr_scale * H['lr'] / kilostep, lr_scale * H['weight_decay'] * batch / kilostep
  lr_biases = lr * H['bias_scaler']
  norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  others = [p for p in model.parameters()
            if p.requires_grad and all(p is not q for q in norm_biases)]
  opt = torch.optim.SGD([dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
                         dict(params=others, lr=lr, weight_decay=wd / lr)],
                        momentum=momentum, nesterov=True)
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: triangle(s, total))


def loss_function():
  return nn.CrossEntropyLoss(label_smoothing=H['label_smoothing'], reduction='sum')


def train_step(model, net, opt, schedule, loss_fn, slow, inputs, labels, step, total, epoch):
  """Step `step` (0-based) of `total` in `epoch`: the whitening bias trains for the first
  whiten_bias_epochs only, the summed loss's SGD step, then lookahead every 5 steps and
  at the last (slow <- slow + (1 - decay)(fast - slow), fast <- slow, over the whole
  state_dict: batch-norm statistics too). `net` is `model` or its compiled form."""
  model[0].bias.requires_grad = epoch < H['whiten_bias_epochs']
  loss = loss_fn(net(inputs), labels)
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  schedule.step()
  done = step + 1
  every = H['lookahead_every']
  if done % every == 0 or done == total:
    decay = lookahead_decay(done, total) if done % every == 0 else 1.0
    with torch.no_grad():
      for k, v in model.state_dict().items():
        if v.dtype in (torch.float16, torch.float32):
          slow[k].lerp_(v, 1 - decay)
          v.copy_(slow[k])
  return loss


def warm_up(model, net, train_x, train_y, test_x, test_y, args, sync):
  """torch.compile compiles at first use, so the timed run starts compiled, as airbench's
  does: train steps with the whitening bias trained and frozen, and the evaluation's
  shape, on the initial state, which is then put back (batch-norm statistics too)."""
  start = time.perf_counter()
  initial = {k: v.clone() for k, v in model.state_dict().items()}
  slow = {k: v.clone() for k, v in initial.items()}
  steps = 10  # the warm-up's schedule length: any length compiles the same graphs
  opt, schedule = optimizer(model, steps)
  loss_fn = loss_function()
  half = (lambda x: x.half()) if args.half else (lambda x: x)
  batch = H['batch_size']
  for step, epoch in enumerate((0, 0, H['whiten_bias_epochs'])):
    train_step(model, net, opt, schedule, loss_fn, slow, half(train_x[:batch]),
               train_y[:batch], step, steps, epoch)
  evaluate(net, half(test_x[:1000]), test_y[:1000], H['tta_level'])
  model.load_state_dict(initial)
  sync()
  print(f'torch.compile warm-up (outside the timed run): {time.perf_counter() - start:.1f} s',
        flush=True)


def train_once(seed, train_x, train_y, test_x, test_y, args, device):
  torch.manual_seed(seed)
  generator = torch.Generator().manual_seed(seed)
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  batch = H['batch_size']
  steps_per_epoch = len(train_x) // batch
  total = math.ceil(steps_per_epoch * args.epochs)

  model = make_net().to(device, memory_format=torch.channels_last)
  if args.half:
    model.half()
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.float()
  net = torch.compile(model) if args.compile else model
  if args.compile:
    warm_up(model, net, train_x, train_y, test_x, test_y, args, sync)
  sync()
  start = time.perf_counter()
  with torch.no_grad():
    model[0].weight.copy_(whitening_weight(train_x[:H['whiten_images']]))
  slow = {k: v.clone() for k, v in model.state_dict().items()}  # after the fit (cnnjax's)
  opt, schedule = optimizer(model, total)
  loss_fn = loss_function()

  pad = H['translate']
  padded = F.pad(train_x, (pad,) * 4, mode='reflect')
  if args.half:
    padded = padded.half()
  flip_bits = torch.rand(len(train_x), generator=generator).to(device) < 0.5
  step = 0
  for epoch in range(math.ceil(args.epochs)):
    order = torch.randperm(len(train_x), generator=generator).to(device)
    for i in range(min(steps_per_epoch, total - step)):
      idx = order[i * batch:(i + 1) * batch]
      inputs = augment_batch(padded, flip_bits, epoch % 2 == 1, idx, generator, pad)
      loss = train_step(model, net, opt, schedule, loss_fn, slow, inputs, train_y[idx],
                        step, total, epoch)
      step += 1
  test_in = test_x.half() if args.half else test_x
  tta = evaluate(net, test_in, test_y, H['tta_level'])
  sync()
  seconds = time.perf_counter() - start
  plain = evaluate(net, test_in, test_y, 0)
  return tta, plain, seconds, float(loss.detach()) / batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', default='cifar10')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: its default)')
  parser.add_argument('--epochs', type=float, default=H['train_epochs'])
  parser.add_argument('--train_examples', type=int, default=0,
                      help='train on the first this many (0: all; a smoke test)')
  parser.add_argument('--compile', action='store_true')
  parser.add_argument('--half', action='store_true')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  source = data.info(args.dataset, download=False)
  train, test = source.load('train', limit=args.train_examples or None), source.load('test')
  train_x, test_x = to_tensor(train.images, device), to_tensor(test.images, device)
  train_y = torch.as_tensor(train.labels, device=device).long()
  test_y = torch.as_tensor(test.labels, device=device).long()
  name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'
  print(f'torch {torch.__version__} on {name} ({torch.get_num_threads()} threads), Recipe G '
        f'(airbench94) on {source.name}: {len(train_x)} train, {len(test_x)} test; '
        f'{args.epochs} epochs{", compiled" if args.compile else ""}'
        f'{", float16" if args.half else ""}', flush=True)
  results = []
  for seed in map(int, args.seeds.split(',')):
    tta, plain, seconds, loss = train_once(seed, train_x, train_y, test_x, test_y, args, device)
    results.append((tta, seconds))
    print(f'seed {seed}: accuracy {tta:.4f} with TTA, {plain:.4f} without; {seconds:.1f} s; '
          f'last train loss {loss:.4f}', flush=True)
  accs, times = np.array(results).T
  print(f'mean accuracy {accs.mean():.4f} +/- {accs.std(ddof=1) if len(accs) > 1 else 0:.4f} '
        f'(n={len(accs)}); mean time {times.mean():.1f} s')


if __name__ == '__main__':
  main()
