"""What a run tells its user: console (progress bar or log lines), metrics.jsonl, TensorBoard.

Only process 0 reports. metrics.jsonl holds one JSON object per logged train step
({"kind": "train", "step", "loss", "learning_rate", "examples_per_sec", "sec_per_batch",
"cross_entropy", "wall_time"}) and per evaluation ({"kind": "eval", "step", "precision", "correct",
"count", "loss", "wall_time"}); train steps are numbered as on the console (the step
taken), evaluations by the number of steps trained. A resumed run first drops what the
checkpoint does not cover, so the history continues without duplicates.
"""
import contextlib
import json
import os
import sys
import time

import jax

from cnnjax.errors import UserError

LOG_FORMAT = 'step %d, loss = %.2f (%.1f examples/sec; %.3f sec/batch)'
METRICS_FILE = 'metrics.jsonl'


def log(message):
  """A console line, from process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


# What each kind of record must hold to be read back (plots, TensorBoard, a resume).
READ_FIELDS = {'train': ('step', 'loss', 'learning_rate', 'examples_per_sec', 'wall_time'),
               'eval': ('step', 'precision', 'count', 'loss', 'wall_time')}


def read_metrics(workdir):
  """The records of workdir/metrics.jsonl ([] if none). A line that is not one is skipped:
  torn by a kill -9 in the middle of a write, or edited by hand (a resume drops it)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path, errors='replace') as f:  # bytes that are not UTF-8: a line not parsed
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if _is_record(record):
        records.append(record)
  return records


def _is_record(r):
  return isinstance(r, dict) and r.get('kind') in READ_FIELDS and all(
      isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
      for k in READ_FIELDS[r['kind']])


def covered(record, step):
  """Whether a checkpoint at `step` already covers `record` (it will not be redone)."""
  if record['kind'] == 'train':
    return record['step'] < step
  return record['step'] <= step


def use_bar(progress, stream):
  """progress ('auto' | 'bar' | 'lines', checked by config.validate) on this stream."""
  return progress == 'bar' or (progress == 'auto' and stream.isatty())


class Reporter:
  """Console, metrics.jsonl and TensorBoard for one run, continuing from `start_step`."""

  def __init__(self, workdir=None, start_step=0, total_steps=0, progress='auto', stream=None):
    self.enabled = jax.process_index() == 0
    self.stream = stream or sys.stdout
    self.bar = None
    self._file = self._writer = None
    self._failed = False  # a write failed (and was said)
    self._eval_steps = set()
    if not self.enabled:
      return
    if workdir is not None:
      self._open_history(workdir, start_step)
    if total_steps and use_bar(progress, self.stream):
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, unit='step', file=self.stream,
                      dynamic_ncols=True, mininterval=0.2)

  def _open_history(self, workdir, start_step):
    # Keep only what the checkpoint covers: the steps after it are about to be redone.
    kept = [r for r in read_metrics(workdir) if covered(r, start_step)]
    path = os.path.join(workdir, METRICS_FILE)
    with open(path + '.tmp', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(path + '.tmp', path)
    self._eval_steps = {r['step'] for r in kept if r['kind'] == 'eval'}
    self._file = open(path, 'a')
    from tensorboardX import SummaryWriter
    # purge_step hides the events of an earlier attempt from start_step on, as
    # metrics.jsonl drops them; the one evaluation kept at start_step is written again.
    self._writer = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                                 purge_step=start_step)
    for r in kept:
      if r['step'] >= start_step:
        self._scalars(r)

  def message(self, text):
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def advance(self, steps=1):
    if self.bar is not None:
      self.bar.update(steps)

  def train(self, step, loss, learning_rate, examples_per_sec, sec_per_batch, cross_entropy):
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.set_postfix(loss=f'{loss:.3f}', ex_per_sec=f'{examples_per_sec:.0f}',
                           refresh=False)
    else:
      self.message(LOG_FORMAT % (step, loss, examples_per_sec, sec_per_batch))
    # cross_entropy: the loss without its weight losses.
    self._record(dict(kind='train', step=step, loss=loss, learning_rate=learning_rate,
                      examples_per_sec=examples_per_sec, sec_per_batch=sec_per_batch,
                      cross_entropy=cross_entropy))

  def eval(self, step, result):
    if not self.enabled:
      return
    self.message(f'step {step}: precision @ 1 = {result["precision"]:.4f} '
                 f'({result["correct"]}/{result["count"]}), eval loss = {result["loss"]:.4f}')
    if step in self._eval_steps:
      return  # a finished run evaluated again: its history has this one already
    self._eval_steps.add(step)
    self._record(dict(kind='eval', step=step, precision=result['precision'],
                      correct=result['correct'], count=result['count'], loss=result['loss']))

  def _record(self, record):
    if self._file is None:
      return
    record['wall_time'] = time.time()
    try:
      self._file.write(json.dumps(record) + '\n')
      self._file.flush()  # a kill loses at most the line being written
      self._scalars(record)
    except OSError as e:  # a full disk, say
      self._failed = True
      raise UserError(f'cannot write the metrics in {os.path.dirname(self._file.name)} '
                      f'({e.strerror or e}); what is written stays: make room and re-run to '
                      'resume from the latest checkpoint') from None

  def _scalars(self, r):
    if r['kind'] == 'train':
      values = {'train/loss': r['loss'], 'train/learning_rate': r['learning_rate'],
                'train/examples_per_sec': r['examples_per_sec']}
    else:
      values = {'eval/precision': r['precision'], 'eval/loss': r['loss']}
    for tag, value in values.items():
      self._writer.add_scalar(tag, value, r['step'], walltime=r['wall_time'])
    self._writer.flush()

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self._file is not None:
      file, writer, self._file, self._writer = self._file, self._writer, None, None
      # After a failed write, closing tries the write again: that failure was said once.
      for closable in (file, writer):
        with contextlib.suppress(OSError) if self._failed else contextlib.nullcontext():
          closable.close()
