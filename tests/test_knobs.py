"""Research knobs: EMA of the weights, the best checkpoint (with a held-out split), gradient
accumulation."""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import data as data_lib
from bhvit_jax import model as model_lib
from bhvit_jax import optim
from bhvit_jax import train
from standin import StandIn
import programs



def _config(**overrides):
  config = programs.demo_config()
  config.data.image_size = 8
  config.update(batch_size=16, total_steps=8, **overrides)
  config.optim.update(schedule='constant', weight_decay=0.01)
  return config


def _step_fn(model, config, **options):
  tx, lr_fn, beta_fn = optim.build_optimizer(config.optim, global_batch_size=16, total_steps=8)
  step = jax.jit(train.make_train_step(model, tx, loss_config=config.loss, lr_fn=lr_fn,
                                       beta_fn=beta_fn, **options))
  return tx, step


def _batch(seed, size=16):
  return {'image': jax.random.normal(jax.random.PRNGKey(seed), (size, 8, 8, 3)),
          'label': jnp.arange(size) % 10}


def test_ema_is_the_closed_form_and_accumulation_updates_batchnorm_per_micro_batch():
  """ema_n = dⁿ·w₀ + (1 − d)·Σ_k d^(n−k)·w_k over the applied steps k (params and BatchNorm
  statistics); a non-finite step leaves the average alone. With 2 micro-batches the running
  statistics after a step are those of the micro-batches (rows j, j + 2, ...) in turn."""
  model, config, decay = StandIn(dropout=0.0), _config(), 0.7
  tx, step = _step_fn(model, config, ema_decay=decay, grad_accum_steps=2)
  variables = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 3)))
  state = train.create_train_state(variables, tx, ema=True)
  live = lambda s: jax.device_get({'params': s.params, 'batch_stats': s.batch_stats})
  applied = [live(state)]
  for i in range(5):
    batch = _batch(i)
    if i == 2:
      batch['image'] = batch['image'].at[0, 0, 0, 0].set(jnp.nan)
    state, metrics = step(state, batch, jax.random.PRNGKey(1))
    assert bool(metrics['finite']) == (i != 2)
    if i != 2:
      applied.append(live(state))
  stats = variables['batch_stats']
  for j in range(2):
    _, updates = model.apply({'params': variables['params'], 'batch_stats': stats},
                             _batch(0)['image'][j::2], train=True, mutable=['batch_stats'])
    stats = updates['batch_stats']
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                         applied[1]['batch_stats'], stats)
  n = len(applied) - 1
  weights = [decay**n] + [(1 - decay) * decay**(n - k) for k in range(1, n + 1)]
  want = jax.tree_util.tree_map(lambda *ws: sum(w * x for w, x in zip(weights, ws)), *applied)
  got = jax.device_get({'params': state.ema_params, 'batch_stats': state.ema_batch_stats})
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7),
                         got, want)
  assert not np.allclose(got['params']['dense']['kernel'],
                         applied[-1]['params']['dense']['kernel'])


def test_accumulating_4_micro_batches_equals_one_step_of_the_whole_batch():
  model, config = StandIn(norm='layer', dropout=0.0), _config()
  variables = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 3)))
  finals = []
  for accum in (1, 4):
    tx, step = _step_fn(model, config, grad_accum_steps=accum)
    state = train.create_train_state(variables, tx)
    for i in range(2):
      state, metrics = step(state, _batch(i), jax.random.PRNGKey(1))
    finals.append((jax.device_get(state.params), jax.device_get(metrics)))
  (one, m_one), (accumulated, m_acc) = finals
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         accumulated, one)
  assert not np.allclose(one['dense']['kernel'], variables['params']['dense']['kernel'])
  for key in ('loss', 'train_top1', 'grad_norm', 'lr'):
    np.testing.assert_allclose(m_acc[key], m_one[key], rtol=1e-5, err_msg=key)
  assert int(m_acc['step']) == 1  # one optimizer update per global batch


def test_holdout_split_is_fixed_and_disjoint():
  kept, held_out = data_lib.holdout_indices(4500, 0.1)
  assert len(held_out) == 450 and len(kept) == 4050
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held_out])), np.arange(4500))
  np.testing.assert_array_equal(held_out, data_lib.holdout_indices(4500, 0.1)[1])
  with pytest.raises(ValueError, match='holdout_fraction=1.0 holds out 10 of the 10'):
    data_lib.holdout_indices(10, 1.0)


def _records(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


def test_best_checkpoint_survives_rotation_with_ema_holdout_and_accumulation(tmp_path,
                                                                            monkeypatch):
  """A whole run: evaluations on the held-out split beside the EMA's, the best one (argmax of
  the logged top-1; scripted so that it is not the last) kept past keep_checkpoints=1, and
  `WORKDIR:best` loads the weights whose evaluation was logged."""
  monkeypatch.setattr(model_lib, 'build', lambda *args: StandIn())
  config = _config(checkpoint_every_steps=2, keep_checkpoints=1, eval_every_steps=2,
                   log_every_steps=2, ema_decay=0.5, grad_accum_steps=2)
  config.data.holdout_fraction = 0.02
  assert data_lib.selection_split(config) == 'holdout'
  real_evaluate, scripted = train.evaluate, iter([50.0, 80.0, 60.0, 80.0])

  def scripted_top1(eval_step, state, batches):
    result = real_evaluate(eval_step, state, batches)
    if state.params is not state.ema_params:  # the live weights
      result['top1'] = next(scripted)
    return result

  monkeypatch.setattr(train, 'evaluate', scripted_top1)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  evals, emas = _records(workdir, 'eval'), _records(workdir, 'eval_ema')
  assert [r['step'] for r in evals] == [r['step'] for r in emas] == [2, 4, 6, 8]
  assert {r['examples'] for r in evals + emas} == {90}  # 2% of the 4,500 training digits
  assert data_lib.num_train_examples(config) == 4410
  held_out = data_lib.holdout_indices(4500, 0.02)[1]
  np.testing.assert_array_equal(data_lib.make_source(config, 'holdout')[3][0],
                                data_lib.MnistSource('train', 8)[int(held_out[3])][0])
  best_step = evals[int(np.argmax([r['top1'] for r in evals]))]['step']
  assert best_step == 4
  assert os.listdir(os.path.join(workdir, 'checkpoints_best')) == ['4']
  assert ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), 2, 1).latest_step() == 8
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '4'))
  model = StandIn()
  eval_step = jax.jit(train.make_eval_step(model))
  for ema, records in ((False, evals), (True, emas)):
    variables = ckpt_lib.load_any(f'{workdir}:best', model, ema=ema)
    state = train.create_train_state(variables, optax.identity())
    result = real_evaluate(eval_step, state, data_lib.build_eval_iter(config, split='holdout'))
    assert result['loss'] == pytest.approx(records[1]['loss'], rel=1e-6)
  assert emas[1]['loss'] != evals[1]['loss']


def test_checkpoint_written_before_the_ema_fields_restores(tmp_path):
  """A train state saved without `ema_params`/`ema_batch_stats` (older runs) resumes with them
  empty instead of being taken for a corrupt checkpoint."""
  variables = {'params': {'w': jnp.arange(3.0)}, 'batch_stats': {'mean': jnp.ones(2)}}
  state = train.create_train_state(variables, optax.identity())
  old = flax.serialization.to_state_dict(state)
  del old['ema_params'], old['ema_batch_stats']
  checkpoints = ckpt_lib.Checkpointer(str(tmp_path), 1, 1)
  checkpoints.save(1, {'train': old}, {})
  checkpoints.wait()
  step, restored, _ = checkpoints.restore({'train': state})
  checkpoints.close()
  assert step == 1 and restored['train'].ema_params == {}
  np.testing.assert_array_equal(restored['train'].params['w'], [0.0, 1.0, 2.0])
