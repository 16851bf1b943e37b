"""Recipe A's train step in PyTorch, timed like bench mode: the peer for cnnjax on a GPU.

    python benchmarks/torch_recipe_a.py [--batch 128] [--steps 200] [--modes eager,compile,reduce-overhead]

The same work as cnnjax's train step (cnnjax/train.py with configs/cifar_lrn.py): a
uint8 batch already on the device, augmented there (random 24x24 crop, left-right flip,
brightness +-63, contrast 0.2-1.8, per-image standardization), the LRN network (conv
5x5x64 + ReLU, max pool 3x3/2 SAME, LRN, conv 5x5x64 + ReLU, LRN, max pool, fc 384,
fc 192, fc 10), cross-entropy + 0.004 * l2_loss of local3's and local4's weights, one
Adam 1e-3 step (fused). Modes: eager; torch.compile of the model, augmentation and loss
(default mode); and the same with mode='reduce-overhead' (CUDA graphs). Prints one line
per mode: mean ms per step and examples/sec over `steps` steps after `burn_in`, then the
best. Runs on the CPU too (slowly), to check it.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

CROP, BRIGHTNESS, CONTRAST, WEIGHT_LOSS = 24, 63.0, (0.2, 1.8), 0.004


def augment(images):
  """uint8 N x 32 x 32 x 3 -> float N x 3 x 24 x 24, as cnnjax.augment.preprocess(train=True)."""
  n, h, w, _ = images.shape
  dev = images.device
  top = torch.randint(0, h - CROP + 1, (n, 1, 1), device=dev)
  left = torch.randint(0, w - CROP + 1, (n, 1, 1), device=dev)
  ar = torch.arange(CROP, device=dev)
  rows, cols = top + ar.view(1, CROP, 1), left + ar.view(1, 1, CROP)
  x = images[torch.arange(n, device=dev).view(n, 1, 1), rows, cols].float()
  flip = torch.rand(n, 1, 1, 1, device=dev) < 0.5
  x = torch.where(flip, x.flip(2), x)
  x = x + torch.empty(n, 1, 1, 1, device=dev).uniform_(-BRIGHTNESS, BRIGHTNESS)
  factor = torch.empty(n, 1, 1, 1, device=dev).uniform_(*CONTRAST)
  mean = x.mean(dim=(1, 2), keepdim=True)
  x = (x - mean) * factor + mean
  mean = x.mean(dim=(1, 2, 3), keepdim=True)
  std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
  x = (x - mean) / torch.clamp(std, min=1.0 / math.sqrt(x[0].numel()))
  return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def max_pool_same(x):
  """tf.nn.max_pool2d(ksize 3, stride 2, 'SAME'): pad the far edges with -inf."""
  h = x.shape[-1]
  pad = max((-(-h // 2) - 1) * 2 + 3 - h, 0)
  x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=float('-inf'))
  return F.max_pool2d(x, 3, 2)


class LRNNet(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
    self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
    # tf.nn.lrn(depth_radius=4, bias=1, alpha=0.001/9, beta=0.75): torch divides alpha by size.
    self.lrn = nn.LocalResponseNorm(9, alpha=0.001, beta=0.75, k=1.0)
    self.local3 = nn.Linear(64 * 6 * 6, 384)
    self.local4 = nn.Linear(384, 192)
    self.logits = nn.Linear(192, 10)

  def forward(self, x):
    x = self.lrn(max_pool_same(F.relu(self.conv1(x))))
    x = max_pool_same(self.lrn(F.relu(self.conv2(x))))
    x = F.relu(self.local3(x.flatten(1)))
    return self.logits(F.relu(self.local4(x)))


def loss_fn(model, images, labels):
  logits = model(augment(images))
  l2 = sum(WEIGHT_LOSS * p.pow(2).sum() / 2 for p in (model.local3.weight, model.local4.weight))
  return F.cross_entropy(logits, labels) + l2


def time_mode(mode, batch, steps, burn_in, device):
  torch.manual_seed(0)
  model = LRNNet().to(device, memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == 'cuda')
  loss = loss_fn if mode == 'eager' else torch.compile(
      loss_fn, mode=None if mode == 'compile' else mode)
  images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, device=device)
  labels = torch.randint(0, 10, (batch,), device=device)

  def step():
    opt.zero_grad(set_to_none=True)
    value = loss(model, images, labels)
    value.backward()
    opt.step()
    return value

  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  for _ in range(burn_in):
    step()
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    value = step()
  sync()
  per_step = (time.perf_counter() - start) / steps
  assert math.isfinite(float(value.detach()))
  return per_step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--burn_in', type=int, default=20)
  parser.add_argument('--modes', default='eager,compile,reduce-overhead')
  args = parser.parse_args()
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'
  print(f'torch {torch.__version__} on {name}, Recipe A train step, batch {args.batch}',
        flush=True)
  best = None
  for mode in args.modes.split(','):
    per_step = time_mode(mode, args.batch, args.steps, args.burn_in, device)
    rate = args.batch / per_step
    print(f'torch {mode}: {per_step * 1e3:.3f} ms/step, {rate:,.0f} examples/sec', flush=True)
    best = max(best or (0, ''), (rate, mode))
  print(f'torch best: {best[1]}, {best[0]:,.0f} examples/sec')


if __name__ == '__main__':
  main()
