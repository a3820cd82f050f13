r"""Top-1, top-5 and mean cross-entropy of a checkpoint on one split of the config's data set.

  python tools/evaluate.py --config configs/demo.py --checkpoint runs/demo
  python tools/evaluate.py --config configs/bhvit_tiny.py --checkpoint bhvit_tiny.pth \
      --config.data.data_dir=/data/imagenet --split eval --json result.json

  python tools/evaluate.py --config configs/demo.py --checkpoint demo.packed

--checkpoint: an orbax run (or checkpoints) directory of `bhvit_jax.train`, a `.msgpack` of
Flax variables, a PyTorch `.pth`/`.pt` (or numpy `.npz`) state dict of the official BHViT, or a
bit-packed file of tools/export_packed.py (any other name; evaluated with the XNOR-popcount
inference, the fastest on CPU). --split: 'eval' (the config's data.eval_split, default), 'train'
(data.train_split, with the eval transform) or a split name. It uses the training loop's
evaluation (train.eval_sums / train.evaluate).
"""
import json
import sys

from absl import flags
import jax
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
  flags.DEFINE_string('checkpoint', None, 'run directory, WORKDIR:<step>, .msgpack, '
                      '.pth/.pt/.npz or packed file', flag_values=flag_values)
  flags.DEFINE_string('split', 'eval', "'eval', 'train' or a split name",
                      flag_values=flag_values)
  flags.DEFINE_integer('batch_size', 0, 'evaluation batch (0: config.batch_size)',
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_string('json', '', 'also write the result as JSON to this path',
                      flag_values=flag_values)
  flags.mark_flags_as_required(['config', 'checkpoint'], flag_values=flag_values)


def split_name(config, split: str) -> str:
  return {'eval': config.data.eval_split, 'train': config.data.train_split}.get(split, split)


def evaluate_checkpoint(config, checkpoint: str, split: str = 'eval', batch_size: int = 0
                        ) -> dict:
  """{'top1', 'top5' (%), 'loss', 'examples', 'split', 'checkpoint'} of `checkpoint`."""
  if ckpt_lib.is_packed_file(checkpoint):
    model, arrays = packed.load(checkpoint)
    step, state = jax.jit(lambda a, batch: train.eval_sums(
        packed.apply(model, a, batch['image']), batch)), arrays
  else:
    model, state = _float_model_state(config, checkpoint)
    step = jax.jit(train.make_eval_step(model))
  _check_data(config, model)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.eval_split = split_name(config, split)
    if batch_size:
      config.eval_batch_size = batch_size
  result = train.evaluate(step, state, data_lib.build_eval_iter(config))
  return {'checkpoint': checkpoint, 'split': config.data.eval_split, **result}


def _float_model_state(config, checkpoint: str):
  model = model_lib.build(config.model, config.compute_dtype)
  variables = ckpt_lib.load_any(checkpoint, model)
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
          ('split', f"{result['split']} ({result['examples']} examples)"),
          ('top-1', f"{result['top1']:.2f} %"), ('top-5', f"{result['top5']:.2f} %"),
          ('mean loss', f"{result['loss']:.4f}")]
  return '\n'.join(f'{name:<11}{value}' for name, value in rows)


def run_evaluation(f, argv):
  del argv
  if f.json:
    cli.check_output(f.json, '--json')  # before the evaluation, not after
  result = evaluate_checkpoint(f.config, f.checkpoint, f.split, f.batch_size)
  print(format_table(result))
  if f.json:
    with cli.output_file(f.json, '--json') as tmp, open(tmp, 'w') as out:
      json.dump(result, out, indent=2)
    print(f'wrote {f.json}')


def main(argv=None):
  return cli.run(run_evaluation, define_flags, argv)


if __name__ == '__main__':
  sys.exit(main())
