r"""Records a reference fixture from a checkout of the official PyTorch BHViT.

  python tools/record_reference.py --torch-repo ~/src/BHViT --config configs/bhvit_tiny.py \
      --config.model.depths='(1,1,1,1)' --config.model.num_classes=10 --out case_mine.npz
  python tools/record_reference.py --torch-repo ~/src/BHViT --config configs/bhvit_tiny.py \
      --weights bhvit_tiny.pth --batch 2 --steps 3 --out steps_mine.npz
  python tools/verify_reference.py case_mine.npz --x64

Imports the official code from the checkout (nothing of it is copied here), builds it with the
configuration's model flags and loads `--weights` (an official `.pth`, or a `.npz` state dict)
or, without them, PyTorch's default initialization under `--seed` with every float parameter
and BatchNorm statistic perturbed by seeded noise (so that no check passes because a value is
exactly 0 or 1). It runs the model in float32 and in float64 (the float32 state upcast) and
writes the fixture format of the reference fixtures' README: state, input, eval and train
logits, cross-entropy, gradients, BatchNorm updates, regularizer, the non-gsb calibration
(`init_demo/*`) and the float64 replays (`f64/*`, gradients included: the float32 backward
pass may take another straight-through decision than the float64 one, so only the float64
gradients can judge a float64 replay). With `--steps K` the same file also holds K
training steps of the fixtures' recipe (AdamW lr 1e-3, label-smoothed CE + 0.1·R): the
forward of each, an update between consecutive ones, the state after the first update.

The input batch is standard-normal noise; the first of up to 10 seeds whose float32 and
float64 forwards agree within 1e-5 (the same sign decisions) is used (`info/rand_seed`).
Exit status 2 with one `error:` line, and no file written, when PyTorch or the checkout is
missing or the configuration is one the official code cannot express.
"""
import json
import os
import sys

import numpy as np

from bhvit_jax import cli
from bhvit_jax import config_lib
from bhvit_jax import official

AGREE_REL = 1e-5  # float32 vs float64 logits: above it, some sign decision differs
INPUT_TRIES = 10


def parse_args(argv):
  parser = cli.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--torch-repo', required=True, help='checkout of the official BHViT')
  parser.add_argument('--config', required=True, help='config file (its `model` is recorded)')
  parser.add_argument('--weights', default='', help='official .pth (or .npz) state dict')
  parser.add_argument('--batch', type=int, default=2, help='images per batch')
  parser.add_argument('--steps', type=int, default=0, help='training steps to record (0: none)')
  parser.add_argument('--seed', type=int, default=0, help='initialization and input seed')
  parser.add_argument('--out', required=True, help='fixture to write (.npz)')
  config, rest = config_lib.load_config(_config_spec(argv), argv)
  args = parser.parse_args(rest)
  if args.batch < 1 or args.steps < 0:
    raise config_lib.UserError(f'--batch {args.batch} / --steps {args.steps}: need batch >= 1, '
                               'steps >= 0')
  if not args.out.endswith('.npz') or not os.path.isdir(os.path.dirname(
      os.path.abspath(args.out))):
    raise config_lib.UserError(f'--out {args.out}: expected a .npz path in an existing directory')
  return args, config


def _config_spec(argv):
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  raise config_lib.UserError('--config is required')


def check_model_config(model_config):
  """UserError for a configuration this project or the official code cannot run."""
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  try:
    model_lib.from_config(model_config)
  except (ValueError, TypeError) as e:
    raise config_lib.UserError(f'invalid model configuration: {e}') from e
  official.check_expressible(model_config)
  if model_config.drop_path:
    raise official.Unsupported(f'model.drop_path={model_config.drop_path}: drop path is random, '
                               'the two frameworks cannot draw the same samples (record with 0)')


def initial_state(args, model) -> dict:
  if not args.weights:
    return official.perturbed(official.state_dict(model), args.seed)
  from bhvit_jax import convert  # pylint: disable=g-import-not-at-top
  try:
    state = convert.load_torch_file(args.weights)
  except (OSError, ValueError, ImportError) as e:
    raise config_lib.UserError(f'--weights {args.weights}: {e}') from e
  official.load_state(model, state, f'--weights {args.weights}')
  return official.state_dict(model)


def _grads(model):
  return {n: official.as_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape),
                                                                           np.float32)
          for n, p in model.named_parameters()}


def _buffers(model):
  return {n: official.as_numpy(b) for n, b in model.named_buffers()
          if n.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}


def _forward(model, state, images, dtype):
  """Eval logits, train logits (one train forward + CE backward), BN buffers, gradients."""
  import torch  # pylint: disable=g-import-not-at-top
  m = official.replica(model, state, dtype)
  x = official.tensor(images['input'], dtype)
  m.eval()
  with torch.no_grad():
    eval_logits = m(x)[0]
  m.train()
  logits = m(x)[0]
  ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(images['labels']))
  ce.backward()
  return {'eval/logits': official.as_numpy(eval_logits),
          'train/logits': official.as_numpy(logits), 'train/ce': official.as_numpy(ce),
          **{f'bn_after_train/{k}': v for k, v in _buffers(m).items()},
          **{f'grad/{k}': v for k, v in _grads(m).items()}}


def _calibration(model, state, images, dtype):
  """`init_demo/*`: a train forward with every quantizer flag reset (non-gsb attention)."""
  flags = [k for k in state if k.endswith('att_prob_quantizer.init_state')]
  if not flags:
    return {}
  fresh = {k: (np.zeros_like(v) if k in flags else v) for k, v in state.items()}
  m = official.replica(model, fresh, dtype)
  m.train()
  logits = m(official.tensor(images['input'], dtype))[0]
  after = {k: v for k, v in official.state_dict(m).items() if 'att_prob_quantizer' in k}
  return {'init_demo/train/logits': official.as_numpy(logits),
          **{f'init_demo/after/{k}': v for k, v in after.items()}}


def _steps(model, state, batches, dtype):
  """K forwards of the recipe with an AdamW update between consecutive ones."""
  import torch  # pylint: disable=g-import-not-at-top
  m = official.replica(model, state, dtype)
  m.train()
  opt = official.adamw(m)
  out = {}
  for i, (images, labels) in enumerate(batches):
    logits = m(official.tensor(images, dtype))[0]
    loss, ce, reg = official.training_loss(m, logits, torch.from_numpy(labels))
    out.update({f'step{i}/logits': official.as_numpy(logits), f'step{i}/loss':
                official.as_numpy(loss), f'step{i}/ce': official.as_numpy(ce),
                f'step{i}/reg': official.as_numpy(reg)})
    if i + 1 < len(batches):
      opt.zero_grad()
      loss.backward()
      opt.step()
      if i == 0:
        out.update({f'after_step0/{k}': v for k, v in official.state_dict(m).items()})
  return out


def _inputs(seed, batch, classes):
  rng = np.random.default_rng(seed)
  return {'input': rng.standard_normal((batch, 3, 224, 224)).astype(np.float32),
          'labels': rng.integers(0, classes, batch).astype(np.int64)}


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def record(args, config) -> dict:
  torch = official.require_torch()
  check_model_config(config.model)
  torch.manual_seed(args.seed)
  model = official.build_model(args.torch_repo, config.model)
  state = initial_state(args, model)
  for attempt in range(INPUT_TRIES):
    seed = args.seed + 1000 + 100 * attempt
    images = _inputs(seed, args.batch, config.model.num_classes)
    f32 = _forward(model, state, images, 'float32')
    f64 = _forward(model, state, images, 'float64')
    if max(_rel(f32[k], f64[k]) for k in ('eval/logits', 'train/logits')) <= AGREE_REL:
      break
  else:
    print(f'warning: no input seed of {INPUT_TRIES} gave float32 and float64 runs the same '
          'sign decisions; judge this fixture with --x64 only', file=sys.stderr)
  arrays = {'config_json': official.config_json(config.model), **images,
            **{f'state/{k}': v for k, v in state.items()}, **f32,
            'train/reg': official.as_numpy(official.regularizer(official.replica(
                model, state, 'float32'))),
            'train/reg_names': np.array(official.regularized_names(model)),
            'info/rand_seed': np.array(seed)}
  # Tensors whose float64 gradient is (near) zero are judged with an absolute tolerance.
  grads64 = {k: v for k, v in f64.items() if k.startswith('grad/')}
  total = np.sqrt(sum(float(np.sum(v ** 2)) for v in grads64.values()))
  arrays['info/grad_near_zero_names'] = np.array(sorted(
      k[len('grad/'):] for k, v in grads64.items() if np.linalg.norm(v) <= 1e-6 * max(total, 1)))
  arrays.update({f'f64/{k}': v for k, v in f64.items()})
  for prefix, dtype in (('', 'float32'), ('f64/', 'float64')):
    arrays.update({prefix + k: v for k, v in _calibration(model, state, images,
                                                          dtype).items()})
  if args.steps:
    rng = np.random.default_rng(seed + 1)
    batches = [(images['input'], images['labels'])] + [
        (rng.standard_normal(images['input'].shape).astype(np.float32),
         rng.integers(0, config.model.num_classes, args.batch).astype(np.int64))
        for _ in range(args.steps - 1)]
    arrays['step0/labels'] = images['labels']
    for i, (x, y) in enumerate(batches[1:], start=1):
      arrays[f'step{i}/input'], arrays[f'step{i}/labels'] = x, y
    arrays['info/recipe'] = json.dumps({**official.RECIPE, 'steps': args.steps})
    for prefix, dtype in (('', 'float32'), ('f64/', 'float64')):
      arrays.update({prefix + k: v for k, v in _steps(model, state, batches, dtype).items()})
  return arrays


def _record(argv):
  args, config = parse_args(argv[1:])
  arrays = record(args, config)
  partial = args.out + '.partial.npz'
  np.savez(partial, **arrays)
  os.replace(partial, args.out)
  parts = 'case' + (f' + {args.steps} training steps' if args.steps else '')
  print(f'wrote {args.out} ({parts}, input seed {int(arrays["info/rand_seed"])}); judge it with: '
        f'python tools/verify_reference.py {args.out} --x64')
  return 0


def main(argv=None):
  return cli.run(_record, argv=argv)


if __name__ == '__main__':
  sys.exit(main())
