r"""Top-1, top-5 and mean cross-entropy of a checkpoint on one split of the config's data set.

  python tools/evaluate.py --config configs/demo.py --checkpoint runs/demo
  python tools/evaluate.py --config configs/bhvit_tiny.py --checkpoint bhvit_tiny.pth \
      --config.data.data_dir=/data/imagenet --split eval --json result.json

  python tools/evaluate.py --config configs/demo.py --checkpoint demo.packed
  python tools/evaluate.py --config configs/bhvit_tiny.py --checkpoint BHViT_tiny.pth \
      --data /data/imagenet/val --predictions val_predictions.jsonl

--checkpoint: an orbax run (or checkpoints) directory of `bhvit_jax.train` (`WORKDIR:<step>`,
`WORKDIR:best` for the best evaluation's weights; `--ema` reads the run's EMA weights), a
`.msgpack` of Flax variables, a PyTorch `.pth`/`.pt` (or numpy `.npz`) state dict of the
official BHViT, or a bit-packed file of tools/export_packed.py (any other name; evaluated with
the XNOR-popcount inference, the fastest on CPU). --split: 'eval' (the config's
data.eval_split, default), 'train' (data.train_split, with the eval transform), 'holdout' (the
part of the train split that data.holdout_fraction held out) or a split name. It uses the training loop's
evaluation (train.eval_sums / train.evaluate) and the config's eval transform (the reference's:
bicubic resize to int(S / data.eval_crop_ratio), centre crop).

--data DIR evaluates the images of DIR/<class>/... directly, without a conversion step: classes
are DIR's sub-directories sorted by name (label = position, as torchvision's ImageFolder), and
files with torchvision's image extensions count. The model must have as many classes as DIR has
class folders (an empty folder keeps its label). An image that does not decode is skipped and
counted (`skipped`), never replaced by another one. --predictions writes one JSON object per
evaluated image: `path` (relative to --data; `index` into the split otherwise), `label`,
`prediction` (the top-1 class) and `logits` (float32 values).
"""
import functools
import json
import os
import sys

from absl import flags
import jax
import numpy as np
import optax

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import cli
from bhvit_jax import config_lib
from bhvit_jax import data as data_lib
from bhvit_jax import model as model_lib
from bhvit_jax import packed
from bhvit_jax import train


def define_flags(flag_values, argv):
  cli.define_config(flag_values, argv)
  flags.DEFINE_string('checkpoint', None, 'run directory, WORKDIR:<step>, WORKDIR:best, '
                      '.msgpack, .pth/.pt/.npz or packed file', flag_values=flag_values)
  flags.DEFINE_string('split', 'eval', "'eval', 'train', 'holdout' or a split name",
                      flag_values=flag_values)
  flags.DEFINE_integer('batch_size', 0, 'evaluation batch (0: config.batch_size)',
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_string('json', '', 'also write the result as JSON to this path',
                      flag_values=flag_values)
  flags.DEFINE_string('data', '', 'image folder DIR/<class>/<image> to evaluate (instead of '
                      'the config data set)', flag_values=flag_values)
  flags.DEFINE_string('predictions', '', 'write per-image logits (JSON lines)',
                      flag_values=flag_values)
  flags.DEFINE_bool('ema', False, "evaluate the run's EMA weights (config.ema_decay > 0)",
                    flag_values=flag_values)
  flags.mark_flags_as_required(['config', 'checkpoint'], flag_values=flag_values)


def split_name(config, split: str) -> str:
  return {'eval': config.data.eval_split, 'train': config.data.train_split}.get(split, split)


def evaluate_checkpoint(config, checkpoint: str, split: str = 'eval', batch_size: int = 0,
                        data_dir: str = '', predictions: str = '', ema: bool = False) -> dict:
  """{'top1', 'top5' (%), 'loss', 'examples', 'skipped', 'split', 'checkpoint'} of
  `checkpoint` on `split` of the config's data set, or on the image folder `data_dir`;
  `predictions`: path of the per-image JSON lines to write; `ema`: the run's EMA weights."""
  config = eval_config(config, split, batch_size, data_dir)
  if ckpt_lib.is_packed_file(checkpoint):
    if ema:
      raise config_lib.UserError(f'--ema: {checkpoint} is a packed file; export it with '
                                 'export_packed.py --ema')
    model, state = packed.load(checkpoint)
    logits_fn = functools.partial(packed.apply, model)
  else:
    model, state = _float_model_state(config, checkpoint, ema)
    logits_fn = train.make_eval_logits(model)
  _check_data(config, model)
  source = data_lib.make_source(config, config.data.eval_split)
  with _PredictionWriter(predictions, source) as writer:
    step = _EvalStep(jax.jit(logits_fn), writer)
    result = train.evaluate(step, state, data_lib.build_eval_iter(config))
  return {'checkpoint': checkpoint, 'split': data_dir or config.data.eval_split, **result,
          'skipped': step.skipped}


def eval_config(config, split: str, batch_size: int, data_dir: str):
  """`config` reading `split`, or every split from the image folder `data_dir`."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.eval_split = split_name(config, split)
    if data_dir:
      if not os.path.isdir(data_dir):
        raise config_lib.UserError(f'--data {data_dir!r} is not a directory')
      config.data.update(name='folder', data_dir=data_dir, train_split='', eval_split='',
                         holdout_fraction=0.0)
    if batch_size:
      config.eval_batch_size = batch_size
  return config


class _EvalStep:
  """train.evaluate's step: sums of one batch; counts skipped images, records predictions."""

  def __init__(self, logits_fn, writer):
    self._logits_fn = logits_fn
    self._sums = jax.jit(train.eval_sums)
    self._writer = writer
    self.skipped = 0

  def __call__(self, state, batch):
    logits = self._logits_fn(state, batch['image'])
    self.skipped += int(np.sum(batch['skipped']))
    self._writer.write(batch, logits)
    return self._sums(logits, {'label': batch['label'], 'mask': batch['mask']})


class _PredictionWriter:
  """JSON lines of per-image predictions, written to `path` + '.tmp' and renamed when done."""

  def __init__(self, path: str, source):
    self._path, self._source, self._file = path, source, None

  def __enter__(self):
    if self._path:
      self._file = open(self._path + '.tmp', 'w')
    return self

  def __exit__(self, exc_type, *_):
    if self._file:
      self._file.close()
      if exc_type is None:
        os.replace(self._path + '.tmp', self._path)
      else:
        os.remove(self._path + '.tmp')

  def write(self, batch, logits):
    if not self._file:
      return
    logits = np.asarray(logits, np.float32)
    relative_path = getattr(self._source, 'relative_path', None)
    for row in np.flatnonzero(batch['mask'] > 0):
      index = int(batch['index'][row])
      where = {'path': relative_path(index)} if relative_path else {'index': index}
      record = {**where, 'label': int(batch['label'][row]),
                'prediction': int(np.argmax(logits[row])),
                'logits': [float(x) for x in logits[row]]}
      self._file.write(json.dumps(record) + '\n')


def _float_model_state(config, checkpoint: str, ema: bool):
  model = model_lib.build(config.model, config.compute_dtype)
  variables = ckpt_lib.load_any(checkpoint, model, ema=ema)
  # The variables travel as jit arguments (inside the state): closing over them would let XLA
  # constant-fold the binarization, whose rounding can flip signs.
  return model, train.create_train_state(variables, optax.identity())


def _check_data(config, model):
  train.check_num_classes(config, model)
  if model.image_size != config.data.image_size:
    raise config_lib.UserError(f'the model takes {model.image_size}² images but the config '
                               f'prepares {config.data.image_size}² (set '
                               '--config.data.image_size)')


def format_table(result: dict) -> str:
  rows = [('checkpoint', result['checkpoint']),
          ('split', f"{result['split']} ({result['examples']} examples, "
                    f"{result['skipped']} unreadable skipped)"),
          ('top-1', f"{result['top1']:.2f} %"), ('top-5', f"{result['top5']:.2f} %"),
          ('mean loss', f"{result['loss']:.4f}")]
  return '\n'.join(f'{name:<11}{value}' for name, value in rows)


def run_evaluation(f, argv):
  del argv
  for path, flag in ((f.json, '--json'), (f.predictions, '--predictions')):
    if path:
      cli.check_output(path, flag)  # before the evaluation, not after
  result = evaluate_checkpoint(f.config, f.checkpoint, f.split, f.batch_size, f.data,
                               f.predictions, f.ema)
  print(format_table(result))
  if f.predictions:
    print(f'wrote {f.predictions}')
  if f.json:
    with cli.output_file(f.json, '--json') as tmp, open(tmp, 'w') as out:
      json.dump(result, out, indent=2)
    print(f'wrote {f.json}')


def main(argv=None):
  return cli.run(run_evaluation, define_flags, argv)


if __name__ == '__main__':
  sys.exit(main())
