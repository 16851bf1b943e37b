"""Recipe G: airbench94 (KellerJordan/cifar10-airbench, legacy/airbench94.py), 94% on
CIFAR-10 in 9.9 epochs, built from the pipeline's general options.

Network (models.FastNet): a frozen 2x2 patch-whitening conv fitted from the first 5,000
train images (its bias trains for 3 epochs), GELU, three conv-pool-BN-GELU-conv-BN-GELU
groups at widths 64/256/256 with identity-initialised filters and frozen BN scales, a
linear head with logits x 1/9. Training: label smoothing 0.2, Nesterov SGD (momentum 0.85)
with 64x the learning rate on the BN biases, airbench's triangular schedule, lookahead
every 5 steps; per-image alternating flips and 2-pixel reflect-padded translations;
evaluation with flip + translation test-time augmentation (level 2).

airbench states its rates per 1,024 examples and sums the loss over the batch; here the
loss is the batch mean and the weight decay is coupled, as PyTorch's SGD does it:
  learning_rate = (lr / kilostep) * batch,  kilostep = 1024 * (1 + 1 / (1 - momentum))
  weight_loss   = (wd / lr_group) / batch,  wd = weight_decay * batch / kilostep,
where lr_group is PyTorch's rate of the group (lr / kilostep, x bias_scaler for the BN
biases), so each group's decay per step, lr_group x weight_loss x batch, is airbench's wd.
"""
import math

from cnnjax.config import augmentation, base_config

# airbench94's hyperparameters as its script states them (its `hyp`).
AIRBENCH94 = dict(train_epochs=9.9, batch_size=1024, lr=11.5, momentum=0.85,
                  weight_decay=0.0153, bias_scaler=64.0, label_smoothing=0.2,
                  whiten_bias_epochs=3, flip=True, translate=2, widths=(64, 256, 256),
                  batchnorm_momentum=0.6, scaling_factor=1 / 9, tta_level=2,
                  whiten_images=5000, lookahead_every=5)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN = 50000


def get_config():
  h = AIRBENCH94
  c = base_config()
  c.recipe = 'G: airbench94 (whitening, GELU/BN, Nesterov + lookahead, TTA)'
  c.model = 'cifar_fast'
  # airbench passes PyTorch momentum=1 - 0.6 (the new batch's weight): flax's 0.6 (the kept).
  c.model_options = dict(widths=h['widths'], batch_norm_momentum=h['batchnorm_momentum'],
                         logit_scale=h['scaling_factor'])
  c.whiten = dict(layer='whiten', images=h['whiten_images'], eps=5e-4)
  batch = c.batch_size = h['batch_size']
  c.eval_batch_size = 1000
  # airbench's loader drops each epoch's last partial batch: 48 steps an epoch, 476 in all.
  c.num_train_steps = math.ceil(CIFAR10_TRAIN // batch * h['train_epochs'])
  c.log_every = 16
  c.eval_every = 0  # at the end only (airbench's figure is the final TTA accuracy)
  c.checkpoint_every = 48
  c.steps_per_dispatch = 16
  c.label_smoothing = h['label_smoothing']

  kilostep = 1024 * (1 + 1 / (1 - h['momentum']))
  lr = h['lr'] / kilostep  # PyTorch's rate on the summed loss
  wd = h['weight_decay'] * batch / kilostep
  lr_biases = lr * h['bias_scaler']
  c.optimizer, c.momentum, c.nesterov = 'momentum', h['momentum'], True
  c.learning_rate = lr * batch
  c.weight_loss_on = 'all'
  c.weight_loss = {'*': wd / lr / batch, '*norm*': wd / lr_biases / batch}
  c.lr_multipliers = {'*norm*/bias': h['bias_scaler']}
  c.freeze_from_epoch = {'whiten/kernel': 0.0, 'whiten/bias': float(h['whiten_bias_epochs'])}
  c.schedule = 'triangular'
  c.triangular = dict(start=0.2, peak_at=0.23, end=0.07)
  c.lookahead = dict(every=h['lookahead_every'], decay=0.95**5, power=3.0)

  c.augment = augmentation(flip=h['flip'], alternating_flip=True, translate=h['translate'],
                           scale='normalize', mean=CIFAR_MEAN, std=CIFAR_STD, tta=h['tta_level'])
  return c
