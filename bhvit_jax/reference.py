"""Judges this implementation against fixtures recorded from the official PyTorch BHViT.

A fixture (fixtures/README.md) is an `.npz` holding any subset of the documented parts: the
forward in eval and train mode, cross-entropy gradients, BatchNorm updates, the regularizer,
the non-gsb calibration, training steps and their float64 replays. `judge` replays whatever is
there, lists the absent parts and returns a JSON-able report with `passed` (whether every
present part agreed). A steps fixture without `state/*` starts from the `case_*.npz` beside it.
"""
import json
import os
import re
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bhvit_jax import config_lib
from bhvit_jax import convert
from bhvit_jax import losses
from bhvit_jax import model as model_lib

# Acceptance thresholds (issue "model + parity"): logits, CE and regularizer relative errors,
# and the share of parameters whose gradient may be off by more than GRAD_REL. Against a
# float64 replay every discrete decision is the reference's, so only rounding is left:
# logits within LOGITS_REL_X64 and every gradient tensor within GRAD_REL of the float32
# reference gradients, or within GRAD_REL_X64 of the float64 replay's where it holds them.
LOGITS_REL = 1e-4
LOGITS_REL_X64 = 1e-10
SCALAR_REL = 1e-5
GRAD_REL = 1e-3
GRAD_SHARE = 0.99
GRAD_REL_X64 = 1e-10  # float64 gradients against the reference's float64 gradients
NEAR_ZERO_ABS_X64 = 1e-12
BN_REL = 1e-4
NEAR_ZERO_ABS = 1e-5
STEP_REL = 1e-8
STATE_REL = 1e-6

# Every key a fixture may hold (README of the fixtures); `f64/` may precede any of them.
_KEY = re.compile(
    r'(f64/)?(config_json|input|labels|state/.+|eval/logits|train/(logits|ce|reg|reg_names)'
    r'|grad/.+|bn_after_train/.+|info/(grad_near_zero_names|rand_seed|recipe)'
    r'|init_demo/(train/logits|after/.+)|step\d+/(logits|loss|ce|reg|labels|input)'
    r'|after_step\d+/.+)$')
# Parts of a fixture: name -> the key prefixes that make it up.
PARTS = {'eval': ('eval/',), 'train': ('train/logits', 'train/ce'), 'grads': ('grad/',),
         'bn_running': ('bn_after_train/',), 'reg': ('train/reg',),
         'calibration': ('init_demo/',), 'steps': ('step',), 'after_step0': ('after_step0/',),
         'f64': ('f64/',)}


def load(path) -> dict:
  """The arrays of fixture `path` by key; UserError when it is not a fixture."""
  if not os.path.isfile(path):
    raise config_lib.UserError(f'fixture not found: {path}')
  if not zipfile.is_zipfile(path):
    raise config_lib.UserError(f'{path} is not an .npz fixture (not a zip archive of arrays)')
  try:
    with np.load(path, allow_pickle=False) as npz:
      data = {k: npz[k] for k in npz.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise config_lib.UserError(f'{path} is not an .npz fixture ({type(e).__name__}: {e})') from e
  unknown = sorted(k for k in data if not _KEY.match(k))
  if unknown:
    raise config_lib.UserError(
        f'{path}: unknown key layout ({len(unknown)} keys not in the fixture format, e.g. '
        f'{", ".join(unknown[:3])})')
  if 'config_json' not in data:
    raise config_lib.UserError(f'{path}: not a fixture (no config_json)')
  return data


def present_parts(data) -> list:
  return [part for part, prefixes in PARTS.items()
          if any(k.startswith(prefixes) or (part != 'f64' and k.startswith(
              tuple('f64/' + p for p in prefixes))) for k in data)]


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


def prefixed(fixture, prefix):
  keys = fixture.files if hasattr(fixture, 'files') else fixture
  return {k[len(prefix):]: fixture[k] for k in keys if k.startswith(prefix)}


class Fixture:
  """A loaded case fixture: model, Flax variables and NHWC inputs, in float32 or float64."""

  @property
  def judged_by_f64(self) -> bool:
    return self.x64 and any(k.startswith('f64/') for k in self.data)

  def __init__(self, path_or_data, x64: bool):
    self.data = load(path_or_data) if isinstance(path_or_data, (str, os.PathLike)) else (
        path_or_data)
    self.x64 = x64
    self.dtype = np.float64 if x64 else np.float32
    self.model = model_lib.BHViT(**model_config_from_reference(str(self.data['config_json'])))
    self.state = prefixed(self.data, 'state/')
    if not self.state:
      raise config_lib.UserError('the fixture holds no state/* (and no case_*.npz beside it)')
    self.variables = convert.torch_to_flax(self.state, self.model, dtype=self.dtype)
    self.images = jnp.asarray(self.data['input'].transpose(0, 2, 3, 1), self.dtype)
    self.labels = jnp.asarray(self.data['labels'], jnp.int32)

  def ref(self, key):
    """The float64 replay of `key` in x64 mode (where recorded), else the float32 value."""
    if self.x64 and f'f64/{key}' in self.data:
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
  """Per-tensor gradient errors. With `--x64` and the float64 replay's gradients
  (`f64/grad/*`) every tensor must agree to rounding: the reference's own float32 gradients may
  take another straight-through decision in the backward pass than its float64 run (one output
  row of a weight then differs by ~1e-3 relative), so they cannot judge a float64 replay.
  Against float32 gradients 99% of the tensors must be within GRAD_REL (all of them in x64)."""
  mine = convert.flax_to_torch({'params': grads})
  by_f64 = fx.x64 and any(k.startswith('f64/grad/') for k in fx.data)
  ref = prefixed(fx.data, 'f64/grad/' if by_f64 else 'grad/')
  rel_limit, abs_limit = (GRAD_REL_X64, NEAR_ZERO_ABS_X64) if by_f64 else (GRAD_REL,
                                                                           NEAR_ZERO_ABS)
  near_zero = set(str(n) for n in fx.data.get('info/grad_near_zero_names', ()))
  rels, worst_abs = {}, 0.0
  for name, value in ref.items():
    if name in near_zero:
      worst_abs = max(worst_abs, float(np.max(np.abs(mine[name] - value))))
    else:
      rels[name] = rel_error(mine[name], value)
  values = np.array(list(rels.values()))
  share_ok = float(np.mean(values <= rel_limit))
  worst5 = sorted(rels, key=rels.get, reverse=True)[:5]
  share = 1.0 if fx.judged_by_f64 else GRAD_SHARE
  return {'reference': 'float64' if by_f64 else 'float32', 'rel_limit': rel_limit,
          'median_rel': float(np.median(values)), 'max_rel': float(values.max()),
          'frac_rel_over_1e-2': float(np.mean(values > 1e-2)), 'worst': worst5[0],
          'worst5': [[n, rels[n]] for n in worst5], 'frac_within_limit': share_ok,
          'near_zero_max_abs': worst_abs, 'count': len(ref)}, (
              share_ok >= share and worst_abs <= abs_limit)


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
  limit = _logits_limit(fx)
  passed = report['train_logits']['rel'] <= limit and report['worst_rel'] <= LOGITS_REL
  return report, passed


def _logits_limit(fx):
  return LOGITS_REL_X64 if fx.judged_by_f64 else LOGITS_REL


def _regularized_names(fx):
  mask = flax.traverse_util.flatten_dict(losses.regularizer_mask(fx.variables['params']))
  return sorted(convert.torch_name(path) for path, selected in mask.items() if selected)


def check_case(path_or_data, x64: bool = False) -> dict:
  """Judges the case parts present in a fixture (forward, gradients, BatchNorm, regularizer,
  calibration); `report['absent']` lists the documented parts it does not hold."""
  fx = Fixture(path_or_data, x64)
  parts = present_parts(fx.data)
  report, ok = {'absent': [p for p in PARTS if p not in parts]}, {}
  limit = _logits_limit(fx)
  if 'eval' in parts:
    logits = jax.jit(lambda v, x: fx.model.apply(v, x, train=False))(fx.variables, fx.images)
    report['eval_logits'] = compare(logits, fx.ref('eval/logits'))
    ok['eval'] = report['eval_logits']['rel'] <= limit
  if {'train', 'grads', 'bn_running'} & set(parts):
    (ce, (logits, updates)), grads = _train_loss(fx.model, fx.variables, fx.images, fx.labels)
    if 'train/logits' in fx.data:
      report['train_logits'] = compare(logits, fx.ref('train/logits'))
      ok['train_logits'] = report['train_logits']['rel'] <= limit
    if 'train/ce' in fx.data:
      report['ce'] = compare(ce, fx.ref('train/ce'))
      ok['ce'] = report['ce']['rel'] <= SCALAR_REL
    if 'grads' in parts:
      report['grads'], ok['grads'] = _grad_report(grads, fx)
    if 'bn_running' in parts and 'batch_stats' in updates:
      report['bn_running'], ok['bn'] = _bn_report(updates, fx)
  if 'reg' in parts:
    reg = losses.oscillation_regularizer(fx.variables['params'])
    report['reg'] = compare(reg, fx.ref('train/reg'))
    if 'train/reg_names' in fx.data:
      report['reg']['names_match'] = _regularized_names(fx) == sorted(
          str(n) for n in fx.data['train/reg_names'])
    ok['reg'] = report['reg']['rel'] <= SCALAR_REL and report['reg'].get('names_match', True)
  if 'calibration' in parts:
    report['calibration'], ok['calibration'] = _calibration_report(fx)
  report['passed'] = all(ok.values())
  return report


def _recipe(fixture_data):
  """The optimizer and loss of a steps fixture (`info/recipe`; README "One training step")."""
  import ml_collections  # pylint: disable=g-import-not-at-top
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
  mine = convert.flax_to_torch({'params': state.params, 'batch_stats': state.batch_stats,
                                'quant_state': state.quant_state})
  f64_ref = any(k.startswith('f64/after_step0/') for k in steps)
  ref = prefixed(steps, 'f64/after_step0/' if (fx.x64 and f64_ref) else 'after_step0/')
  rels, ok = {}, True
  for name, value in ref.items():
    if name.endswith(('num_batches_tracked', 'init_state')):
      ok &= np.array_equal(np.asarray(mine[name]).astype(int), np.asarray(value).astype(int))
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


def _step_batches(fx, steps):
  """The batch of every recorded step: step 0 is the case's input, step i its `step<i>/input`."""
  batches, i = [], 0
  while f'step{i}/loss' in steps or f'step{i}/logits' in steps:
    images = fx.images if i == 0 else jnp.asarray(
        steps[f'step{i}/input'].transpose(0, 2, 3, 1), fx.dtype)
    labels = steps.get(f'step{i}/labels', fx.data['labels'] if i == 0 else None)
    batches.append({'image': images, 'label': jnp.asarray(labels, jnp.int32)})
    i += 1
  return batches


def check_steps(steps, fx) -> dict:
  """Replays the recorded training steps through the project's own jitted train step."""
  from bhvit_jax import optim, train  # pylint: disable=g-import-not-at-top
  optim_config, loss_config = _recipe(steps)
  batches = _step_batches(fx, steps)
  tx, lr_fn, beta_fn = optim.build_optimizer(optim_config, global_batch_size=1,
                                             total_steps=len(batches))
  step_fn = jax.jit(train.make_train_step(fx.model, tx, loss_config=loss_config, lr_fn=lr_fn,
                                          beta_fn=beta_fn))
  forward = jax.jit(lambda v, x: fx.model.apply(v, x, train=True, calibrate=True,
                                                mutable=['batch_stats', 'quant_state'])[0])
  state = train.create_train_state(fx.variables, tx)
  use_f64 = fx.x64 and any(k.startswith('f64/step') for k in steps)
  ref = lambda key: steps[f'f64/{key}'] if use_f64 and f'f64/{key}' in steps else steps[key]
  limit = STEP_REL if use_f64 else LOGITS_REL
  report, ok, rng = {}, {}, jax.random.PRNGKey(0)
  for i, batch in enumerate(batches):
    if f'step{i}/logits' in steps:
      report[f'step{i}_logits'] = compare(forward(state.variables(), batch['image']),
                                          ref(f'step{i}/logits'))
    new_state, metrics = step_fn(state, batch, rng)
    total = metrics['loss'] + 0.1 * metrics['reg']  # the reference's loss: smoothed CE + 0.1·R
    for key, value in (('loss', total), ('ce', metrics['ce'])):
      if f'step{i}/{key}' in steps:
        report[f'step{i}_{key}'] = compare(value, ref(f'step{i}/{key}'))
    if i == 0 and any(k.startswith('after_step0/') for k in steps):
      report['state_after'], ok['state_after'] = _state_report(new_state, fx, steps,
                                                               optim_config.base_lr)
    state = new_state
  ok.update({k: v['rel'] <= limit for k, v in report.items() if k.startswith('step')})
  report['steps'] = len(batches)
  report['passed'] = all(ok.values())
  return report


def _case_for(path, data):
  """The data a steps fixture starts from: itself when it holds state/*, else the case_*.npz
  beside it (the public fixtures are split that way)."""
  if any(k.startswith('state/') for k in data):
    return data
  case = os.path.join(os.path.dirname(os.path.abspath(path)),
                      os.path.basename(path).replace('steps_', 'case_', 1))
  if case == os.path.abspath(path) or not os.path.isfile(case):
    raise config_lib.UserError(f'{path}: training steps without state/*, and no {case} to '
                               'start from')
  return load(case)


def judge(path, x64: bool = False) -> dict:
  """Replays every part fixture `path` holds; see the module docstring."""
  data = load(path)
  parts = present_parts(data)
  case_parts = [p for p in parts if p not in ('steps', 'after_step0', 'f64')]
  report = {}
  if case_parts:
    report = check_case(data, x64)
  else:
    report['absent'] = [p for p in PARTS if p not in parts]
  if 'steps' in parts:
    steps_report = check_steps(data, Fixture(_case_for(path, data), x64))
    passed = report.get('passed', True) and steps_report.pop('passed')
    report.update(steps_report)
    report['passed'] = passed
  if 'passed' not in report:
    raise config_lib.UserError(f'{path}: the fixture holds nothing to judge (parts: '
                               f'{", ".join(parts) or "none"})')
  return report
