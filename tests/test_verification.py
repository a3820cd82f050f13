"""Verification as a feature: partial fixtures, recording from and training beside an official
checkout (tools/record_reference.py, tools/compare_training.py), and a train step that never
skips the quantizers' first-batch calibration (the README's functional path)."""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import checkpoint
from bhvit_jax import config_lib
from bhvit_jax import train
from conftest import REPO

sys.path.insert(0, str(REPO / 'tools'))


@pytest.fixture(scope='module')
def functional(tmp_path_factory):
  """Runs the README's functional-path example; its namespace."""
  text = (REPO / 'README.md').read_text()
  code = re.search(r'### The functional path.*?```python\n(.*?)```', text, re.S).group(1)
  workdir = tmp_path_factory.mktemp('functional')
  code = code.replace("'runs/functional/", f"'{workdir}/").replace(
      "'configs/demo.py'", f"'{REPO / 'configs' / 'demo.py'}'")
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  namespace['workdir'] = workdir
  return namespace


def test_readme_functional_path_trains_and_checkpoints(functional):
  ns = functional
  state = ns['state']
  assert int(state.step) == 3 and bool(ns['metrics']['finite'])
  assert model_calibrated(state.quant_state)
  restored = checkpoint.load_variables(str(ns['workdir']))
  for mine, saved in zip(jax.tree_util.tree_leaves(state.params),
                         jax.tree_util.tree_leaves(restored['params'])):
    np.testing.assert_array_equal(np.asarray(mine), saved)


def model_calibrated(quant_state):
  flags = jax.tree_util.tree_leaves(quant_state)
  return bool(flags) and all(bool(np.all(np.asarray(f) == 1)) for f in flags)


def test_train_step_calibrates_uncalibrated_variables_or_refuses(functional):
  ns = functional
  model, tx, batch, rng = ns['model'], ns['tx'], ns['batch'], jax.random.PRNGKey(1)
  uncalibrated, calibrated = ns['variables'], ns['calibrated']
  assert not model_calibrated(uncalibrated['quant_state'])
  # SPEC §7: the first-batch α is 2·√3/Nk for every head (Nk = 1 window token + 4 or 1 global).
  alphas = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
      calibrated['params']) if 'att_prob_quantizer' in str(p) and 'alpha' in str(p)]
  np.testing.assert_allclose(np.unique(np.round(np.concatenate(alphas), 5)),
                             [2 * 3 ** 0.5 / 5, 2 * 3 ** 0.5 / 2], rtol=1e-5)

  # Calibrating: the same step on never-calibrated variables equals calibrate-then-step.
  explicit, m_explicit = ns['step'](train.create_train_state(calibrated, tx), batch, rng)
  implicit, m_implicit = ns['step'](train.create_train_state(uncalibrated, tx), batch, rng)
  assert float(m_implicit['loss']) == pytest.approx(float(m_explicit['loss']), rel=1e-6)
  assert model_calibrated(implicit.quant_state)
  # α and z included: a skipped calibration would have updated α = 1, z = 0 instead.
  for a, b in zip(jax.tree_util.tree_leaves(implicit.params),
                  jax.tree_util.tree_leaves(explicit.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

  # Refusing: built with calibrate=False, the step names model.calibrate, and runs once the
  # variables are calibrated.
  refusing = train.make_train_step(model, tx, loss_config=ns['config'].loss,
                                   lr_fn=ns['lr_fn'], beta_fn=ns['beta_fn'], calibrate=False)
  with pytest.raises(config_lib.UserError, match=r'model\.calibrate'):
    refusing(train.create_train_state(uncalibrated, tx), batch, rng)

