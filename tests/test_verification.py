"""Verification as a feature: partial fixtures, recording from and training beside an official
checkout (tools/record_reference.py, tools/compare_training.py), and a train step that never
skips the quantizers' first-batch calibration (the README's functional path)."""
import json
import os
import re
import sys

import jax
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


def test_train_step_refuses_uncalibrated_variables_naming_model_calibrate(functional):
  ns = functional
  model, tx, batch, rng = ns['model'], ns['tx'], ns['batch'], jax.random.PRNGKey(1)
  uncalibrated, calibrated = ns['variables'], ns['calibrated']
  assert not model_calibrated(uncalibrated['quant_state'])
  # docs/reference.md §7: the first-batch α is 2·√3/Nk for every head (Nk = 1 window token + 4 or 1 global).
  alphas = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
      calibrated['params']) if 'att_prob_quantizer' in str(p) and 'alpha' in str(p)]
  np.testing.assert_allclose(np.unique(np.round(np.concatenate(alphas), 5)),
                             [2 * 3 ** 0.5 / 5, 2 * 3 ** 0.5 / 2], rtol=1e-5)

  # Refusing: the step names model.calibrate for never-calibrated variables, unjitted and
  # jitted, and runs once they are calibrated.
  step = train.make_train_step(model, tx, loss_config=ns['config'].loss, lr_fn=ns['lr_fn'],
                               beta_fn=ns['beta_fn'])
  with pytest.raises(config_lib.UserError, match=r'model\.calibrate'):
    step(train.create_train_state(uncalibrated, tx), batch, rng)
  with pytest.raises(Exception, match=r'model\.calibrate'):
    jax.block_until_ready(ns['step'](train.create_train_state(uncalibrated, tx), batch, rng))
  state, metrics = ns['step'](train.create_train_state(calibrated, tx), batch, rng)
  assert np.isfinite(float(metrics['loss'])) and int(state.step) == 1


# ------------------------------------------------------- partial fixtures ---


def test_partial_fixture_judges_what_is_there(case_public, tmp_path, capsys, x64):
  import verify_reference  # pylint: disable=g-import-not-at-top
  with np.load(case_public) as full:
    kept = {k: full[k] for k in full.files
            if k.startswith(('state/', 'eval/', 'f64/eval/')) or k in (
                'config_json', 'input', 'labels')}
  path = tmp_path / 'case_eval_only.npz'
  np.savez(path, **kept)
  from bhvit_jax import reference  # pylint: disable=g-import-not-at-top
  report = reference.judge(str(path), x64=True)
  assert report['passed'] and report['eval_logits']['rel'] <= 1e-12
  assert report['absent'] == ['train', 'grads', 'bn_running', 'reg', 'calibration', 'steps',
                              'after_step0']
  # A steps fixture without state/* and no case_*.npz beside it, random bytes, unknown keys
  # and a missing file: one error line each, exit status 2.
  with np.load(case_public) as full:
    np.savez(tmp_path / 'steps_alone.npz', config_json=full['config_json'],
             **{'step0/loss': np.float32(1)})
  (tmp_path / 'junk.npz').write_bytes(os.urandom(512))
  np.savez(tmp_path / 'other.npz', config_json='{}', weights=np.zeros(3))
  for name, message in (('steps_alone.npz', 'without state'), ('junk.npz', 'not an .npz'),
                        ('other.npz', 'unknown key layout'), ('missing.npz', 'does not exist')):
    assert verify_reference.main(['verify_reference', str(tmp_path / name)]) == 2, name
    assert_one_error_line(capsys, message)


def assert_one_error_line(capsys, fragment):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and fragment in err[0], err


# ------------------------------------------------------ official checkout ---


VERIFY_CONFIG = str(REPO / 'configs' / 'verify.py')


def test_record_refuses_what_it_cannot_record(tmp_path, monkeypatch, capsys):
  import record_reference  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'case.npz'
  base = ['record_reference', '--config', VERIFY_CONFIG, '--out', str(out)]
  cases = ((['--torch-repo', str(tmp_path), '--config.model.window_size=1'], 'window_size=1'),
           (['--torch-repo', str(tmp_path)], 'missing transformer/BHViT.py'))
  for extra, message in cases:
    assert record_reference.main(base + extra) == 2
    assert_one_error_line(capsys, message)
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if PyTorch were not installed
  assert record_reference.main(base + ['--torch-repo', str(tmp_path)]) == 2
  assert_one_error_line(capsys, '[torch] extra')
  assert not out.exists()


def test_record_then_verify_round_trip(torch_repo, tmp_path, x64):
  import record_reference  # pylint: disable=g-import-not-at-top
  from bhvit_jax import reference  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'case_recorded.npz'
  assert record_reference.main(['record_reference', '--torch-repo', torch_repo, '--config', VERIFY_CONFIG,
                                '--batch', '2', '--seed', '3', '--out', str(out)]) == 0
  report = reference.judge(str(out), x64=True)
  assert report['absent'] == ['steps', 'after_step0'], report['absent']
  assert report['passed'], report
  assert max(report['eval_logits']['rel'], report['train_logits']['rel']) <= 1e-10
  # Gradients against the official float64 gradients: its float32 backward pass may take
  # another straight-through decision (one output row of a weight then differs by ~1e-3).
  grads = report['grads']
  assert grads['reference'] == 'float64' and grads['count'] > 100
  assert grads['max_rel'] <= 1e-10 and grads['near_zero_max_abs'] <= 1e-12
  assert report['calibration']['train_logits']['rel'] <= 1e-10


def test_compare_training_agrees_every_step_in_float64(torch_repo, tmp_path, capsys, x64):
  import compare_training  # pylint: disable=g-import-not-at-top
  png = tmp_path / 'curves.png'
  code = compare_training.main(['compare_training', '--torch-repo', torch_repo, '--steps', '3', '--x64',
                                '--png', str(png)])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert code == 0 and result['dtype'] == 'float64' and len(result['loss_rel']) == 3
  for step, rel in enumerate(result['loss_rel']):
    assert rel <= 1e-9, (step, rel)
  assert result['params']['max_rel'] <= 1e-6
  assert png.stat().st_size > 1000
