"""Checks against fixtures recorded from the official PyTorch BHViT (fixtures/README.md).

`check_case` replays a `case_*.npz` (forward in eval and train mode, cross-entropy gradients,
BatchNorm updates, regularizer, non-gsb calibration); `check_steps` (in `train_check.py`)
replays a `steps_*.npz` training step. Both return a JSON-able report with `passed`.
"""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bhvit_jax import config_lib
from bhvit_jax import convert
from bhvit_jax import losses
from bhvit_jax import model as model_lib

# Acceptance thresholds (issue "model + parity"): logits, CE and regularizer relative errors,
# and the share of parameters whose gradient may be off by more than GRAD_REL.
LOGITS_REL = 1e-4
SCALAR_REL = 1e-5
GRAD_REL = 1e-3
GRAD_SHARE = 0.99
BN_REL = 1e-4
NEAR_ZERO_ABS = 1e-5


def model_config_from_reference(config_json: str) -> dict:
  """`config_json` of a fixture (reference vit_config + cli_flags) -> `BHViT` fields."""
  cfg = json.loads(config_json)
  vc, fl = cfg['vit_config'], cfg['cli_flags']
  return dict(
      hidden_sizes=tuple(vc['hidden_size']), depths=tuple(vc['depths']),
      num_heads=tuple(vc['num_attention_heads']), mlp_sizes=tuple(vc['intermediate_size']),
      num_classes=int(fl['nb_classes']), image_size=int(vc.get('image_size', 224)),
      patch_size=int(vc.get('patch_size', 4)), window_size=int(vc.get('window_size', 7)),
      weight_bits=int(fl['weight_bits']), input_bits=int(fl['input_bits']),
      norm='batch' if fl['replace_ln_bn'] else 'layer', shift3=bool(fl['shift3']),
      shift5=bool(fl['shift5']), some_fp=bool(fl['some_fp']), gsb=bool(fl['gsb']),
      recu=bool(fl['recu']), disable_layerscale=bool(fl['disable_layerscale']))


def rel_error(mine, ref):
  mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
  denom = np.linalg.norm(ref)
  diff = np.linalg.norm(mine - ref)
  return float(diff / denom) if denom > 0 else float(diff)


def compare(mine, ref):
  mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
  return {'max_abs': float(np.max(np.abs(mine - ref))) if mine.size else 0.0,
          'rel': rel_error(mine, ref)}


def open_fixture(path, required=('config_json', 'input', 'labels')):
  """The arrays of a fixture `.npz`; UserError if unreadable or lacking `required` keys."""
  try:
    data = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise config_lib.UserError(f'fixture not found ({path})') from None
  except Exception as e:  # pylint: disable=broad-except  (zip, pickle and OS errors)
    raise config_lib.UserError(f'not a readable .npz fixture: {type(e).__name__}: {e} ({path})'
                               ) from None
  files = getattr(data, 'files', None)
  if files is None:
    raise config_lib.UserError(f'not an .npz fixture: a single array ({path})')
  missing = [k for k in required if k not in files]
  if missing:
    raise config_lib.UserError(f'not a reference fixture of this project: no '
                               f'{", ".join(missing)} ({path})')
  return data


def prefixed(fixture, prefix):
  return {k[len(prefix):]: fixture[k] for k in fixture.files if k.startswith(prefix)}


class Fixture:
  """A loaded case fixture: model, Flax variables and NHWC inputs, in float32 or float64."""

  def __init__(self, path, x64: bool):
    self.data = open_fixture(path)
    self.x64 = x64
    self.dtype = np.float64 if x64 else np.float32
    self.model = model_lib.BHViT(**model_config_from_reference(str(self.data['config_json'])))
    self.state = prefixed(self.data, 'state/')
    self.variables = convert.torch_to_flax(self.state, self.model, dtype=self.dtype)
    self.images = jnp.asarray(self.data['input'].transpose(0, 2, 3, 1), self.dtype)
    self.labels = jnp.asarray(self.data['labels'], jnp.int32)

  def ref(self, key):
    """The float64 replay of `key` in x64 mode (where recorded), else the float32 value."""
    if self.x64 and f'f64/{key}' in self.data.files:
      return self.data[f'f64/{key}']
    return self.data[key]

  def ref_group(self, prefix):
    group = prefixed(self.data, prefix)
    if self.x64:
      group.update(prefixed(self.data, 'f64/' + prefix))
    return group


def _train_loss(model, variables, images, labels):
  def loss_fn(params):
    # As the reference's train forward: a quantizer whose flag is still 0 calibrates first.
    logits, updates = model.apply({**variables, 'params': params}, images, train=True,
                                  calibrate=True, mutable=['batch_stats', 'quant_state'])
    return losses.cross_entropy(logits, labels), (logits, updates)
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])


def _grad_report(grads, fx):
  mine = convert.flax_to_torch({'params': grads})
  ref = prefixed(fx.data, 'grad/')
  near_zero = set(str(n) for n in fx.data['info/grad_near_zero_names'])
  rels, worst_abs = {}, 0.0
  for name, value in ref.items():
    if name in near_zero:
      worst_abs = max(worst_abs, float(np.max(np.abs(mine[name] - value))))
    else:
      rels[name] = rel_error(mine[name], value)
  values = np.array(list(rels.values()))
  worst = max(rels, key=rels.get)
  share_ok = float(np.mean(values <= GRAD_REL))
  return {'median_rel': float(np.median(values)), 'max_rel': float(values.max()),
          'frac_rel_over_1e-2': float(np.mean(values > 1e-2)), 'worst': worst,
          'frac_within_1e-3': share_ok, 'near_zero_max_abs': worst_abs,
          'count': len(ref)}, share_ok >= GRAD_SHARE and worst_abs <= NEAR_ZERO_ABS


def _bn_report(updates, fx):
  mine = convert.flax_to_torch({'batch_stats': updates['batch_stats']})
  ref = fx.ref_group('bn_after_train/')
  worst, worst_rel, max_abs = None, 0.0, 0.0
  for name, value in ref.items():
    if name.endswith('num_batches_tracked'):
      if int(mine[name]) != int(value):
        return {'worst': name, 'rel': float('inf')}, False
      continue
    r = rel_error(mine[name], value)
    max_abs = max(max_abs, float(np.max(np.abs(mine[name] - value))))
    if r >= worst_rel:
      worst, worst_rel = name, r
  return {'worst': worst, 'rel': worst_rel, 'max_abs': max_abs}, worst_rel <= BN_REL


def _calibration_report(fx):
  """Replays the non-gsb first-batch calibration (`init_demo/*`)."""
  variables = dict(fx.variables)
  variables['quant_state'] = jax.tree.map(jnp.zeros_like, variables['quant_state'])
  calibrated, logits = model_lib.calibrate(fx.model, variables, fx.images)
  report = {'train_logits': compare(logits, fx.ref('init_demo/train/logits'))}
  mine = convert.flax_to_torch(calibrated)
  after = fx.ref_group('init_demo/after/')
  report['worst_rel'] = max(rel_error(mine[name], value) for name, value in after.items())
  passed = report['train_logits']['rel'] <= LOGITS_REL and report['worst_rel'] <= LOGITS_REL
  return report, passed


def _regularized_names(fx):
  mask = flax.traverse_util.flatten_dict(losses.regularizer_mask(fx.variables['params']))
  return sorted(convert.torch_name(path) for path, selected in mask.items() if selected)


def check_case(path, x64: bool = False) -> dict:
  """Compares this implementation with a reference case fixture; see fixtures/README.md."""
  fx = Fixture(path, x64)
  report, ok = {}, {}
  eval_logits = jax.jit(lambda v, x: fx.model.apply(v, x, train=False))(fx.variables, fx.images)
  report['eval_logits'] = compare(eval_logits, fx.ref('eval/logits'))
  (ce, (train_logits, updates)), grads = _train_loss(fx.model, fx.variables, fx.images,
                                                     fx.labels)
  report['train_logits'] = compare(train_logits, fx.ref('train/logits'))
  report['ce'] = compare(ce, fx.ref('train/ce'))
  reg = losses.oscillation_regularizer(fx.variables['params'])
  report['reg'] = compare(reg, fx.ref('train/reg'))
  report['reg']['names_match'] = _regularized_names(fx) == sorted(
      str(n) for n in fx.data['train/reg_names'])
  ok['logits'] = max(report['eval_logits']['rel'], report['train_logits']['rel']) <= LOGITS_REL
  ok['scalars'] = (max(report['ce']['rel'], report['reg']['rel']) <= SCALAR_REL
                   and report['reg']['names_match'])
  report['grads'], ok['grads'] = _grad_report(grads, fx)
  if 'batch_stats' in updates:
    report['bn_running'], ok['bn'] = _bn_report(updates, fx)
  if any(k.startswith('init_demo/') for k in fx.data.files):
    report['calibration'], ok['calibration'] = _calibration_report(fx)
  report['passed'] = all(ok.values())
  return report


STEP_REL = 1e-8
STATE_REL = 1e-6


def _recipe(fixture_data):
  """The optimizer and loss of a steps fixture (`info/recipe`; README "One training step")."""
  import ml_collections
  recipe = json.loads(str(fixture_data['info/recipe'])) if 'info/recipe' in fixture_data else {}
  text = recipe.get('optimizer', '')
  lr = float(text.split('lr=')[1].split()[0]) if 'lr=' in text else 1e-3
  optim_config = ml_collections.ConfigDict(dict(
      base_lr=lr, lr_batch_scale=1, schedule='constant', warmup_steps=0, min_lr=0.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, reg_beta=0.1,
      reg_start_fraction=0.0))
  loss_config = ml_collections.ConfigDict(dict(label_smoothing=0.1, ce_weight=1.0,
                                               distill_weight=0.0))
  return optim_config, loss_config


def _state_report(state, fx, steps, lr):
  """Parameters and BatchNorm buffers after the update against `after_step0/*`."""
  mine = convert.flax_to_torch({'params': state.params, 'batch_stats': state.batch_stats})
  f64_ref = any(k.startswith('f64/after_step0/') for k in steps.files)
  ref = prefixed(steps, 'f64/after_step0/' if (fx.x64 and f64_ref) else 'after_step0/')
  rels, ok = {}, True
  for name, value in ref.items():
    if name.endswith('num_batches_tracked'):
      ok &= int(mine[name]) == int(value)
      continue
    rels[name] = rel_error(mine[name], value)
    if rels[name] > STATE_REL and not (fx.x64 and not f64_ref):
      ok = False
    elif rels[name] > STATE_REL:
      # Against a float32 reference, Adam's first step (|update| <= lr per element) turns
      # float32 rounding of near-cancelling gradients into differences of up to 2·lr.
      ok &= float(np.max(np.abs(mine[name] - value))) <= 2 * lr
  values = np.array(list(rels.values()))
  return {'median_rel': float(np.median(values)), 'max_rel': float(values.max()),
          'frac_rel_over_1e-6': float(np.mean(values > STATE_REL)),
          'worst': max(rels, key=rels.get), 'reference': 'f64' if (fx.x64 and f64_ref)
          else 'f32', 'count': len(rels)}, bool(ok)


def check_steps(path, x64: bool = False) -> dict:
  """Replays a `steps_*.npz` fixture through the project's own jitted train step."""
  import os
  from bhvit_jax import optim, train  # pylint: disable=g-import-not-at-top
  steps = open_fixture(path, ('step0/labels', 'step1/input', 'step1/labels'))
  case = os.path.join(os.path.dirname(os.path.abspath(path)),
                      os.path.basename(path).replace('steps_', 'case_', 1))
  fx = Fixture(case, x64)
  optim_config, loss_config = _recipe(steps)
  tx, lr_fn, beta_fn = optim.build_optimizer(optim_config, global_batch_size=1, total_steps=2)
  step_fn = jax.jit(train.make_train_step(fx.model, tx, loss_config=loss_config, lr_fn=lr_fn,
                                          beta_fn=beta_fn))
  state = train.create_train_state(fx.variables, tx)
  rng = jax.random.PRNGKey(0)
  batch0 = {'image': fx.images, 'label': jnp.asarray(steps['step0/labels'], jnp.int32)}
  batch1 = {'image': jnp.asarray(steps['step1/input'].transpose(0, 2, 3, 1), fx.dtype),
            'label': jnp.asarray(steps['step1/labels'], jnp.int32)}
  state, metrics0 = step_fn(state, batch0, rng)
  _, metrics1 = step_fn(state, batch1, rng)
  ref = lambda key: steps[f'f64/{key}'] if x64 and f'f64/{key}' in steps.files else steps[key]
  total = lambda m: m['loss'] + 0.1 * m['reg']  # the reference's loss: smoothed CE + 0.1·R
  logits1, _ = fx.model.apply(state.variables(), batch1['image'], train=True,
                              mutable=['batch_stats'])
  report = {'step0_loss': compare(total(metrics0), ref('step0/loss')),
            'step0_ce': compare(metrics0['ce'], ref('step0/ce')),
            'step1_logits': compare(logits1, ref('step1/logits')),
            'step1_loss': compare(total(metrics1), ref('step1/loss'))}
  report['state_after'], state_ok = _state_report(state, fx, steps, optim_config.base_lr)
  limit = STEP_REL if x64 else LOGITS_REL
  report['passed'] = state_ok and all(
      report[k]['rel'] <= limit for k in ('step0_loss', 'step0_ce', 'step1_logits',
                                           'step1_loss'))
  return report
