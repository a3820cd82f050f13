"""Training loop: one step learns, resume is exact, non-finite steps are skipped, checkpoints."""
import json
import logging
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
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
  config.batch_size = 16
  config.total_steps = 6
  config.checkpoint_every_steps = 3
  config.eval_every_steps = 4
  config.log_every_steps = 2
  config.optim.warmup_steps = 2
  config.optim.reg_beta = 0.1
  config.optim.weight_decay = 0.01
  config.update(overrides)
  return config


@pytest.fixture
def tiny_model(monkeypatch):
  monkeypatch.setattr(model_lib, 'build', lambda *args: StandIn())


def _leaves(state):
  return jax.tree_util.tree_leaves(jax.device_get(state))


def test_resume_is_bitwise_identical(tmp_path, tiny_model):
  del tiny_model
  config = _config()
  straight, summary = train.train_and_evaluate(config, str(tmp_path / 'a'))
  assert summary['step'] == 6 and 0 <= summary['top1'] <= 100
  assert os.path.exists(summary['plot'])
  _, first = train.train_and_evaluate(config, str(tmp_path / 'b'), should_stop=lambda s: s == 3)
  assert first['top1'] is None and first['step'] == 3
  resumed, _ = train.train_and_evaluate(config, str(tmp_path / 'b'))
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  losses_a, losses_b = (
      {r['step']: r['loss'] for r in _records(tmp_path / run) if r['kind'] == 'train'}
      for run in ('a', 'b'))
  # Records average their logging interval; the restart splits the one ending at step 4.
  assert losses_a[2] == losses_b[2] and losses_a[6] == losses_b[6]
  assert [2, 3, 4, 6] == sorted(losses_b)  # history before the restart was restored


def test_sigterm_during_final_evaluation_keeps_the_last_step(tmp_path, tiny_model, monkeypatch):
  """The final checkpoint is written under the SIGTERM flag and the rerun only evaluates."""
  del tiny_model
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers need the main thread')
  config = _config(eval_every_steps=0)
  real_eval_iter = data_lib.build_eval_iter

  def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    yield from real_eval_iter(*args, **kwargs)

  monkeypatch.setattr(data_lib, 'build_eval_iter', signalled)
  # Outside the loop's own handler SIGTERM is ignored, so a regression fails the asserts
  # instead of killing the test process.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    _, stopped = train.train_and_evaluate(config, str(tmp_path / 'b'))
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert stopped['top1'] is None and stopped['step'] == 6
  assert ckpt_lib.Checkpointer(str(tmp_path / 'b' / 'checkpoints'), 3, 3).latest_step() == 6
  assert not [r for r in _records(tmp_path / 'b') if r['kind'] == 'eval']
  monkeypatch.setattr(data_lib, 'build_eval_iter', real_eval_iter)
  resumed, rerun = train.train_and_evaluate(config, str(tmp_path / 'b'))
  straight, summary = train.train_and_evaluate(config, str(tmp_path / 'a'))
  assert rerun['top1'] == summary['top1'] is not None
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def _records(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def test_nonfinite_batches_are_skipped_then_stop(tmp_path, tiny_model, monkeypatch):
  del tiny_model
  real_iter = data_lib.build_train_iter

  class Poisoned:
    """Batches 2, 3, ... have NaN pixels."""
    def __init__(self, config, start_step=0, **process_block):
      self._it = real_iter(config, start_step, **process_block)
    def __iter__(self):
      return self
    def __next__(self):
      step = self._it.get_state()['step']
      batch = next(self._it)
      return {**batch, 'image': batch['image'] * (np.nan if step >= 2 else 1.0)}
    def get_state(self):
      return self._it.get_state()
    def set_state(self, state):
      self._it.set_state(state)

  monkeypatch.setattr(data_lib, 'build_train_iter', Poisoned)
  config = _config(max_nonfinite_in_row=3, checkpoint_every_steps=2, eval_every_steps=0)
  with pytest.raises(train.NonFiniteError, match=r'stopping at step 4: 3 consecutive.*'
                     r'checkpoints[/\\]2'):
    train.train_and_evaluate(config, str(tmp_path))
  records = [r for r in _records(tmp_path) if r['kind'] == 'train']
  assert records[-1]['nonfinite_total'] == 3


def test_train_step_skips_nan_and_keeps_state():
  model = StandIn()
  config = _config()
  config.optim.schedule = 'constant'
  tx, lr_fn, beta_fn = optim.build_optimizer(config.optim, global_batch_size=16, total_steps=6)
  variables = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 3)))
  state = train.create_train_state(variables, tx)
  step = jax.jit(train.make_train_step(model, tx, loss_config=config.loss, lr_fn=lr_fn,
                                       beta_fn=beta_fn))
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  labels = jnp.array([0, 1, 2, 3])
  bad, metrics = step(state, {'image': images.at[0, 0, 0, 0].set(jnp.inf), 'label': labels},
                      jax.random.PRNGKey(2))
  assert not metrics['finite'] and int(bad.nonfinite_in_row) == 1 and int(bad.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state)),
                  jax.tree_util.tree_leaves((bad.params, bad.batch_stats, bad.opt_state))):
    np.testing.assert_array_equal(a, b)
  good, metrics = step(bad, {'image': images, 'label': labels}, jax.random.PRNGKey(2))
  assert metrics['finite'] and int(good.nonfinite_in_row) == 0 and int(good.nonfinite_total) == 1
  assert not np.array_equal(good.params['dense']['kernel'], state.params['dense']['kernel'])


def test_short_run_lowers_loss():
  config = _config()
  config.optim.update(base_lr=1e-2, lr_batch_scale=16, schedule='constant')
  model = StandIn()
  tx, lr_fn, beta_fn = optim.build_optimizer(config.optim, global_batch_size=16, total_steps=20)
  batch = next(data_lib.build_train_iter(config))
  state = train.create_train_state(model_lib.init_variables(model, jax.random.PRNGKey(0)), tx)
  step = jax.jit(train.make_train_step(model, tx, loss_config=config.loss, lr_fn=lr_fn,
                                       beta_fn=beta_fn))
  seen, flips = [], []
  for _ in range(20):
    state, metrics = step(state, batch, jax.random.PRNGKey(0))
    seen.append(float(metrics['loss']))
    flips.append(float(metrics['sign_flip_rate']))
  assert np.mean(seen[-3:]) < 0.7 * seen[0], seen
  assert all(0 <= f <= 1 for f in flips) and max(flips) > 0


def test_sign_flip_rate_by_hand():
  old = {'dense': {'kernel': jnp.array([[1.0, -1.0], [3.0, 1.0]])},
         'classifier': {'kernel': jnp.ones((2, 2))}}
  new = {'dense': {'kernel': jnp.array([[1.0, -1.0], [0.5, 2.0]])},
         'classifier': {'kernel': -jnp.ones((2, 2))}}
  mask = model_lib.binary_kernel_mask(old, StandIn())
  assert mask == {'dense': {'kernel': True}, 'classifier': {'kernel': False}}
  # Output channel 0: [1, 3] centres to [-1, +1], [1, .5] to [+.25, -.25]: 2 flips.
  # Output channel 1: [-1, 1] and [-1, 2] both centre to signs [-, +]: no flip.
  np.testing.assert_allclose(train.sign_flip_rate(old, new, mask), 2 / 4)


def test_checkpoint_falls_back_past_corrupt_latest_and_reports_shapes(tmp_path, caplog):
  manager = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=3)
  tree = {'params': {'w': jnp.arange(6.0).reshape(2, 3)}, 'step': jnp.array(0)}
  for step in (1, 2):
    manager.save(step, {**tree, 'step': jnp.array(step)}, {'data_state': {'step': step},
                                                           'blob': b'\x00\x01'})
  manager.wait()
  for root, _, files in os.walk(tmp_path / '2' / 'state'):
    for name in files:
      open(os.path.join(root, name), 'wb').close()
  with caplog.at_level(logging.WARNING):
    step, restored, meta = manager.restore(tree)
  assert step == 1 and int(restored['step']) == 1
  assert meta == {'data_state': {'step': 1}, 'blob': b'\x00\x01'}
  assert 'unreadable' in caplog.text and os.path.isdir(tmp_path / 'corrupt_2')
  wrong = {'params': {'w': jnp.zeros((3, 3)), 'extra': jnp.zeros(2)}, 'step': jnp.array(0)}
  with pytest.raises(ckpt_lib.ShapeMismatchError, match=r'(?s)params/w: checkpoint \(2, 3\) vs '
                     r'model \(3, 3\).*params/extra: missing in checkpoint'):
    manager.restore(wrong)
  manager.close()


def test_regularizer_in_loss_or_in_optimizer_gives_the_same_params():
  config = _config()
  config.optim.update(schedule='constant', reg_beta=0.5, weight_decay=0.0)
  model = StandIn()
  variables = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 3)))
  batch = {'image': jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3)),
           'label': jnp.array([0, 1, 2, 3])}
  finals = []
  for in_loss in (False, True):
    tx, lr_fn, beta_fn = optim.build_optimizer(config.optim, global_batch_size=16,
                                               total_steps=3, reg_in_optimizer=not in_loss)
    state = train.create_train_state(variables, tx)
    step = jax.jit(train.make_train_step(model, tx, loss_config=config.loss, lr_fn=lr_fn,
                                         beta_fn=beta_fn, reg_in_loss=in_loss))
    for _ in range(3):
      state, _ = step(state, batch, jax.random.PRNGKey(2))
    finals.append(state.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         *finals)
  assert not np.allclose(finals[0]['cov1']['kernel'], variables['params']['cov1']['kernel'])
