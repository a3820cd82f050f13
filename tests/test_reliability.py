"""The real entry point survives SIGKILL (even mid-checkpoint) and SIGTERM bitwise, and explains
every failure as one `error:` line (exit 1 or 2) without touching what is on disk.

The entry-point runs are `python -m bhvit_jax.train --config configs/demo.py` with a tiny
model; they share a persistent XLA compilation cache, so only the first one compiles the step.
The loop's own guarantees (schedules after a skipped step, the update guard, a repeated
evaluation, config.json, telling a broken checkpoint from a read error) are checked in-process
with a stand-in model.
"""
import functools
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from array_record.python import array_record_module
from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import config_lib
from bhvit_jax import data as data_lib
from bhvit_jax import model as model_lib
from bhvit_jax import optim
from bhvit_jax import plots
from bhvit_jax import train
from standin import StandIn
import programs

REPO = programs.REPO
TINY = ['--config.model.hidden_sizes=(16,32,64,128)', '--config.model.mlp_sizes=(32,64,128,256)',
        '--config.batch_size=8', '--config.total_steps=12', '--config.checkpoint_every_steps=3',
        '--config.keep_checkpoints=10', '--config.eval_every_steps=0',
        '--config.log_every_steps=1', '--config.optim.warmup_steps=2',
        # Whole grouped convs compile ~25% faster; the tests compare runs of one config.
        '--config.model.split_groups=False']
TMP_SUFFIX = '.orbax-checkpoint-tmp'


@pytest.fixture(scope='session')
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp('xla_cache')
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(cache),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
          'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}


def _command(workdir, *overrides):
  key = lambda arg: arg.split('=', 1)[0]
  tiny = [a for a in TINY if key(a) not in set(map(key, overrides))]
  return [sys.executable, '-m', 'bhvit_jax.train', '--config', 'configs/demo.py',
          '--workdir', str(workdir), *tiny, *overrides]


def _start(env, workdir, *overrides):
  return subprocess.Popen(_command(workdir, *overrides), cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run(env, workdir, *overrides, timeout=600):
  return subprocess.run(_command(workdir, *overrides), cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=timeout)


def _wait_for(proc, condition, what, timeout=600):
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f'process ended before {what}:\n{proc.communicate()[1][-3000:]}')
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.005)


def _entries(workdir):
  try:
    return os.listdir(workdir / 'checkpoints')
  except FileNotFoundError:
    return []


def _train_records(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if r['kind'] == 'train']


def _max_step(workdir):
  try:
    return max((r['step'] for r in _train_records(workdir)), default=0)
  except (FileNotFoundError, json.JSONDecodeError):  # being rewritten
    return 0


def _by_step(workdir, keys=('loss', 'ce', 'grad_norm', 'lr', 'train_top1', 'finite')):
  return {r['step']: tuple(r[k] for k in keys) for r in _train_records(workdir)}


def _tree_digest(path):
  """sha256 over every file's relative path and bytes under `path`."""
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(os.path.relpath(full, path).encode())
      digest.update(pathlib.Path(full).read_bytes())
  return digest.hexdigest()


def _assert_clean_error(result, code, *patterns):
  assert result.returncode == code, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  for pattern in patterns:
    assert re.search(pattern, result.stderr), (pattern, result.stderr[-3000:])


# The tests of the entry-point runs form one xdist group apart from the in-process ones below.
on_runs = pytest.mark.xdist_group('test_reliability_runs')


@pytest.fixture(scope='session')
def runs(env, tmp_path_factory):
  """An uninterrupted run, and one SIGKILLed while writing its step-6 checkpoint, copied
  aside there, restarted, SIGTERMed, and restarted again to the end."""
  root = tmp_path_factory.mktemp('runs')
  straight, broken = root / 'straight', root / 'broken'
  result = _run(env, straight)
  assert result.returncode == 0, result.stderr[-3000:]

  proc = _start(env, broken)
  writing_6 = lambda: any(e.startswith('6' + TMP_SUFFIX) for e in _entries(broken))
  _wait_for(proc, writing_6, 'the step-6 checkpoint write')
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  killed_at = sorted(_entries(broken))
  snapshot = root / 'at_kill'
  shutil.copytree(broken, snapshot)

  proc = _start(env, broken)
  # metrics.jsonl still shows the killed run's steps until the restart rewrites it from the
  # checkpoint's history (steps 1..3). Tiny steps take milliseconds, so the run is paused
  # once past step 3 to make sure SIGTERM arrives inside the training loop.
  rewritten = []
  def resumed_training():
    step = _max_step(broken)
    if 0 < step <= 3:
      rewritten.append(step)
    return bool(rewritten) and step >= 4
  _wait_for(proc, resumed_training, 'the restarted run to pass step 3')
  proc.send_signal(signal.SIGSTOP)
  assert _max_step(broken) < 12, 'the restarted run finished before it could be signalled'
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGCONT)
  sigterm_out, sigterm_err = proc.communicate(timeout=300)
  sigterm = (proc.returncode, sigterm_out, sigterm_err, sorted(_entries(broken)))

  final = _run(env, broken)
  assert final.returncode == 0, final.stderr[-3000:]
  return {'straight': straight, 'straight_stdout': result.stdout, 'broken': broken,
          'killed_at': killed_at,
          'snapshot': snapshot, 'sigterm': sigterm, 'final': final}


@on_runs
def test_sigkill_mid_checkpoint_then_restart_is_bitwise_identical(runs):
  killed_at = runs['killed_at']
  assert '3' in killed_at and '6' not in killed_at, killed_at  # 6 was still a temporary dir
  assert any(e.startswith('6' + TMP_SUFFIX) for e in killed_at), killed_at
  assert 'Resuming from' in runs['final'].stdout
  _assert_same_variables(runs['straight'], runs['broken'])
  # One record per step (log_every_steps=1): the stitched history equals the straight one.
  history = _by_step(runs['broken'])
  assert sorted(history) == list(range(1, 13))
  assert history == _by_step(runs['straight'])
  top1 = lambda out: re.search(r'held-out top-1: ([\d.]+)%', out).group(1)
  assert top1(runs['final'].stdout) == top1(runs['straight_stdout'])
  # The orbax temporary directory of the interrupted write was cleaned up on restart.
  assert not any(TMP_SUFFIX in e for e in _entries(runs['broken']))


def _assert_same_variables(workdir_a, workdir_b):
  """The newest checkpoints' params, batch statistics and quantizer flags are bitwise equal."""
  a = _flatten(ckpt_lib.load_variables(str(workdir_a)))
  b = _flatten(ckpt_lib.load_variables(str(workdir_b)))
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _flatten(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}/'))
    else:
      out[f'{prefix}{key}'] = np.asarray(value)
  return out


@on_runs
def test_sigterm_saves_a_checkpoint_and_exits_zero(runs):
  code, out, err, entries = runs['sigterm']
  assert code == 0, err[-3000:]
  match = re.search(r'stopped at step (\d+); checkpoint saved, rerun the same command', out)
  assert match, out
  assert 4 <= int(match.group(1)) <= 12 and match.group(1) in entries, (match.group(1), entries)
  assert 'Resuming from' in out and 'at step 3' in out  # the run it resumed from


@on_runs
def test_same_seed_gives_the_same_first_steps_in_two_fresh_runs(runs):
  # The metrics the killed run wrote before SIGKILL (steps 1..6 at least) come from a second
  # fresh process with the same config and seed.
  fresh = _by_step(runs['snapshot'])
  straight = _by_step(runs['straight'])
  assert len(fresh) >= 6 and fresh == {step: straight[step] for step in fresh}


@on_runs
def test_nonfinite_streak_stops_naming_step_and_last_good_checkpoint(env, runs, tmp_path):
  # Resume the copy taken at the kill (newest complete checkpoint: 3) with a zero std, which
  # makes every image non-finite: the real model's steps 4 and 5 are skipped, then it stops.
  workdir = tmp_path / 'nan'
  shutil.copytree(runs['snapshot'], workdir)
  before = _tree_digest(workdir / 'checkpoints' / '3')
  result = _run(env, workdir, '--config.data.std=(0.,0.,0.)', '--config.max_nonfinite_in_row=2',
                '--config.allow_config_change=True')
  _assert_clean_error(result, 1, r'error: stopping at step 4: 2 consecutive steps with '
                      r'non-finite', r'Last good checkpoint: \S*checkpoints/3\b')
  records = _train_records(workdir)
  assert [(r['step'], r['finite'], r['nonfinite_total']) for r in records[-2:]] == [
      (4, 0.0, 1), (5, 0.0, 2)]
  assert _tree_digest(workdir / 'checkpoints' / '3') == before
  # Nothing was written after checkpoint 3, which is byte-identical: a rerun resumes from it as
  # the restart in `runs` does.
  assert sorted(e for e in _entries(workdir) if TMP_SUFFIX not in e) == ['3']


def test_mistyped_config_key_is_named_with_a_suggestion(env, tmp_path):
  result = _run(env, tmp_path / 'w', '--config.optim.base_lrr=1', '--config.modle.depths=(1,)')
  _assert_clean_error(result, 2, r'unknown config key config\.optim\.base_lrr \(did you mean '
                      r'config\.optim\.base_lr\?\)', r'config\.modle\.depths \(did you mean '
                      r'config\.model\.depths')
  assert not (tmp_path / 'w').exists()


def test_invalid_model_and_data_values_are_all_listed(env, tmp_path):
  missing = tmp_path / 'no_such_dir'
  result = _run(env, tmp_path / 'w', '--config.model.mlp_sizes=(24,64,128,256)',
                '--config.model.num_heads=(1,1,3,4)', '--config.model.window_size=3',
                '--config.data.name=imagefolder', f'--config.data.data_dir={missing}')
  _assert_clean_error(
      result, 2, r'mlp_sizes\[0\]=24 is not an integer multiple of hidden_sizes\[0\]=16',
      r'num_heads\[2\]=3 does not divide hidden_sizes\[2\]=64',
      r'stage-3/4 grids 2 and 1 must be divisible by window_size=3',
      re.escape(str(missing)) + r"' does not exist")
  assert not (tmp_path / 'w').exists()


@on_runs
def test_checkpoint_of_another_model_is_refused_and_left_untouched(env, runs, tmp_path):
  workdir = tmp_path / 'other'
  shutil.copytree(runs['snapshot'], workdir)
  # Allowed as a config change, the other model still meets the shape check.
  result = _run(env, workdir, '--config.model.mlp_sizes=(64,128,256,512)',
                '--config.allow_config_change=True')
  _assert_clean_error(result, 2, r'does not match the current model', r'Nothing on disk')
  # Every MLP doubles: the normalization over the last block's hidden units grows 2x.
  match = re.search(r'batch_stats/layerB_1/intermediate/norm/var: checkpoint \((\d+),\) vs '
                    r'model \((\d+),\)', result.stderr)
  assert match and 2 * int(match.group(1)) == int(match.group(2)), result.stderr
  # Orbax drops the interrupted step-6 temporary directory; checkpoint 3 is byte-identical.
  assert sorted(e for e in _entries(workdir) if TMP_SUFFIX not in e) == ['3']
  assert (_tree_digest(workdir / 'checkpoints' / '3')
          == _tree_digest(runs['snapshot'] / 'checkpoints' / '3'))


def test_torch_file_that_is_not_a_bhvit_state_dict(env, tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'resnet.pth'
  torch.save({'conv1.weight': torch.zeros(4, 3, 3, 3), 'fc.bias': torch.zeros(10)}, path)
  result = _run(env, tmp_path / 'w', f'--config.init_from={path}')
  _assert_clean_error(result, 2, r'does not match the current model',
                      r'conv1\.weight: not in the model', r'missing in checkpoint')


def _imagefolder(tmp_path, records):
  writer = array_record_module.ArrayRecordWriter(
      str(tmp_path / 'train.array_record-00000-of-00001'), 'group_size:1')
  for record in records:
    writer.write(record)
  writer.close()
  (tmp_path / 'labels.json').write_text(json.dumps(['a', 'b', 'c']))
  config = programs.demo_config()
  config.data.update(name='imagefolder', data_dir=str(tmp_path), image_size=8,
                     min_crop_scale=1.0)
  config.batch_size = 2
  return config


def test_corrupt_image_is_skipped_with_a_count_or_fails_by_config(tmp_path):
  png = io.BytesIO()
  Image.new('RGB', (8, 8), (255, 0, 0)).save(png, format='PNG')
  config = _imagefolder(tmp_path, [data_lib.encode_record(png.getvalue(), 1),
                                   data_lib.encode_record(b'\x89PNG truncated', 2)])
  config.data.on_corrupt = 'fail'
  # An epoch is one batch holding both records.
  with pytest.raises(data_lib.CorruptRecordError,
                     match=r"record 1 of 'train'.*not a readable image.*on_corrupt='skip'"):
    next(data_lib.build_train_iter(config, process_index=0, process_count=1))
  config.data.on_corrupt = 'skip'
  skipped = data_lib.corrupt_records_skipped()
  batch = next(data_lib.build_train_iter(config, process_index=0, process_count=1))
  # The corrupt record 1 is replaced by the next readable one (record 0, wrapping around).
  np.testing.assert_array_equal(batch['label'], [1, 1])
  # Loader threads prefetch later batches too, each skipping the record once more.
  assert data_lib.corrupt_records_skipped() > skipped


def test_dotted_key_suggestions_cover_nested_keys():
  config = programs.demo_config()
  config_lib.check_keys(config, ['optim.base_lr', 'model', 'loss.teacher.kind'])
  with pytest.raises(config_lib.ConfigError, match=r'config\.loss\.teacher\.kind\?'):
    config_lib.check_keys(config, ['loss.teacher.knd'])
  with pytest.raises(config_lib.ConfigError, match=r'unknown config key config\.zzz$'):
    config_lib.check_keys(config, ['zzz'])
  with pytest.raises(config_lib.ConfigError, match=r'^config\.model\.depths is given 2 times$'):
    config_lib.check_keys(config, ['model.depths', 'seed', 'model.depths'])


# ------------------------------------------ the loop in-process, with a stand-in model ---
# The runs below call `train.train_and_evaluate` with a three-layer stand-in of BHViT's
# interface (it compiles in about a second) on 8×8 digits; step 2's batch is made non-finite.

POISONED_STEP = 2


class _PoisonedIter:
  """The real train iterator with NaN pixels in the batch of POISONED_STEP."""

  def __init__(self, real, *args, **kwargs):
    self._it = real(*args, **kwargs)

  def __iter__(self):
    return self

  def __next__(self):
    step = self._it.get_state()['step']
    batch = next(self._it)
    return {**batch, 'image': batch['image'] * (np.nan if step == POISONED_STEP else 1.0)}

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def _stand_in(mp, poisoned=True):
  mp.setattr(model_lib, 'build',
             lambda *args: StandIn(width=4, stride=2, hidden=0, dropout=0.0))
  mp.setattr(plots, 'plot_runs', lambda *args: None)  # matplotlib: 3 s a run, not tested here
  if poisoned:
    mp.setattr(data_lib, 'build_train_iter',
               functools.partial(_PoisonedIter, data_lib.build_train_iter))


def _loop_config(**overrides):
  config = programs.demo_config()
  config.data.image_size = 8
  config.update(batch_size=16, total_steps=6, checkpoint_every_steps=2, keep_checkpoints=10,
                eval_every_steps=2, log_every_steps=1)
  # lr rises every step of the warm-up; β switches on at step 3 and is carried by the loss.
  config.optim.update(warmup_steps=5, reg_beta=0.1, reg_start_fraction=0.5,
                      reg_placement='loss')
  config.update(overrides)
  return config


def _records_of(workdir):
  """metrics.jsonl, refusing NaN/Infinity as strict JSON readers do."""
  def refuse(token):
    raise ValueError(f'non-JSON constant {token}')
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line, parse_constant=refuse) for line in lines]


def _sigterm_during_first_evaluation(mp):
  real = data_lib.build_eval_iter

  def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    yield from real(*args, **kwargs)
  mp.setattr(data_lib, 'build_eval_iter', signalled)


@pytest.fixture(scope='module')
def loop(tmp_path_factory):
  """An uninterrupted run; one SIGTERMed during its step-2 periodic evaluation (copied aside
  there as `cut`) and rerun to the end."""
  root = tmp_path_factory.mktemp('loop')
  config = _loop_config()
  with pytest.MonkeyPatch.context() as mp:
    _stand_in(mp)
    straight_state, straight = train.train_and_evaluate(config, str(root / 'straight'))
    # Outside the loop's handler SIGTERM is ignored: a regression fails the asserts instead
    # of killing pytest.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
      with pytest.MonkeyPatch.context() as signalling:
        _sigterm_during_first_evaluation(signalling)
        _, stopped = train.train_and_evaluate(config, str(root / 'resumed'))
    finally:
      signal.signal(signal.SIGTERM, previous)
    shutil.copytree(root / 'resumed', root / 'cut')
    resumed_state, resumed = train.train_and_evaluate(config, str(root / 'resumed'))
  return {'root': root, 'config': config, 'straight': straight, 'straight_state': straight_state,
          'stopped': stopped, 'resumed': resumed, 'resumed_state': resumed_state}


def _schedule_counts(state):
  return [s.count for s in jax.tree_util.tree_leaves(
      state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
          if isinstance(s, optax.ScaleByScheduleState)]


def test_skipped_step_leaves_lr_and_beta_on_the_applied_updates(loop):
  config = loop['config']
  lr_fn = optim.learning_rate_schedule(config.optim, global_batch_size=16, total_steps=6)
  beta_fn = optim.beta_schedule(config.optim, 6)
  train_records = [r for r in _records_of(loop['root'] / 'straight') if r['kind'] == 'train']
  assert [r['finite'] for r in train_records] == [1, 1, 0, 1, 1, 1]
  # Step 2 is skipped, so steps 2 and 3 both log (and step 3 applies) update number 2.
  applied = [0, 1, 2, 2, 3, 4]
  np.testing.assert_allclose([r['lr'] for r in train_records],
                             [float(lr_fn(n)) for n in applied], rtol=1e-6)
  assert [r['beta'] for r in train_records] == [float(beta_fn(n)) for n in applied]
  assert float(lr_fn(2)) != float(lr_fn(3)) and float(beta_fn(2)) != float(beta_fn(3))
  # The optimizer's own counter: 5 updates; the last logged lr is the one of its last update.
  (count,) = _schedule_counts(loop['straight_state'])
  assert int(count) == 5 == int(loop['straight_state'].step) - 1
  assert train_records[-1]['lr'] == pytest.approx(float(lr_fn(int(count) - 1)), rel=1e-6)


def test_periodic_evaluation_cut_short_is_repeated(loop):
  assert loop['stopped'] == {'step': 2, 'top1': None, 'plot': None}
  assert not [r for r in _records_of(loop['root'] / 'cut') if r['kind'] == 'eval']
  evals = lambda run: {r['step']: (r['top1'], r['loss'])
                       for r in _records_of(loop['root'] / run) if r['kind'] == 'eval'}
  assert sorted(evals('straight')) == [2, 4, 6]
  assert evals('resumed') == evals('straight')
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(loop['straight_state'])),
                  jax.tree_util.tree_leaves(jax.device_get(loop['resumed_state']))):
    np.testing.assert_array_equal(a, b)


def test_config_json_records_the_run(loop):
  record = json.loads((loop['root'] / 'straight' / 'config.json').read_text())
  assert record['config']['batch_size'] == 16 and record['config']['optim']['warmup_steps'] == 5
  assert record['process_count'] == 1 and record['mesh'] == {'data': jax.device_count(),
                                                             'fsdp': 1}
  assert record['versions']['jax'] == jax.__version__ and record['changes'] == []


def _copy(loop, run, tmp_path):
  shutil.copytree(loop['root'] / run, tmp_path / run)
  return tmp_path / run


def test_changed_trajectory_key_is_refused_unless_allowed(loop, tmp_path, monkeypatch, caplog):
  _stand_in(monkeypatch)
  workdir = _copy(loop, 'cut', tmp_path)
  before = _tree_digest(workdir)
  # log_every_steps may change freely; batch_size changes the schedule and the data order.
  changed = _loop_config(batch_size=32, log_every_steps=2)
  with pytest.raises(config_lib.UserError, match=r"holds a run with another configuration: "
                     r"batch_size \(16 -> 32\); .*allow_config_change=True") as error:
    train.train_and_evaluate(changed, str(workdir))
  assert '\n' not in str(error.value) and 'log_every_steps' not in str(error.value)
  assert _tree_digest(workdir) == before
  changed.allow_config_change = True
  with caplog.at_level(logging.WARNING):
    _, summary = train.train_and_evaluate(changed, str(workdir), should_stop=lambda s: s == 3)
  assert summary['step'] == 3 and 'changed configuration: batch_size (16 -> 32)' in caplog.text
  record = json.loads((workdir / 'config.json').read_text())
  assert record['changes'] == [{'step': 2, 'changed': {'batch_size': [16, 32]}}]
  assert record['config']['batch_size'] == 32


@pytest.mark.parametrize('broken', ['nan_lr', 'nan_opt_state'])
def test_nonfinite_update_is_skipped_then_stops(broken, tmp_path, monkeypatch):
  _stand_in(monkeypatch, poisoned=False)
  config = _loop_config(max_nonfinite_in_row=2, checkpoint_every_steps=1, eval_every_steps=0)
  if broken == 'nan_lr':
    config.optim.base_lr = float('nan')
  else:
    real_create = train.create_train_state

    def with_nan_moment(variables, tx, **kwargs):
      state = real_create(variables, tx, **kwargs)
      adam = next(s for s in state.opt_state if isinstance(s, optax.ScaleByAdamState))
      mu = jax.tree_util.tree_map(lambda m: m.at[(0,) * m.ndim].set(jnp.nan), adam.mu)
      return state.replace(opt_state=tuple(
          s._replace(mu=mu) if s is adam else s for s in state.opt_state))
    monkeypatch.setattr(train, 'create_train_state', with_nan_moment)
  with pytest.raises(train.NonFiniteError, match=r'^stopping at step 1: 2 consecutive steps '
                     r'with non-finite loss, gradients or update .*Last good checkpoint: none'
                     ) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert '\n' not in str(error.value)
  records = [r for r in _records_of(tmp_path) if r['kind'] == 'train']
  assert [(r['step'], r['finite'], r['nonfinite_total']) for r in records] == [(1, 0, 1),
                                                                              (2, 0, 2)]
  # The loss and gradients were fine; the update was not, and nothing of it was kept: the
  # regularizer of the kernels before step 2 is the one of the initial kernels.
  assert all(r['loss'] is not None and r['grad_norm'] is not None for r in records)
  assert records[1]['reg'] == records[0]['reg'] is not None
  assert (records[0]['lr'] is None) == (broken == 'nan_lr')
  assert ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), 1, 1).latest_step() is None


def _largest_tensor_file(checkpoint):
  files = [p for p in checkpoint.glob('state/**/d/*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def test_transient_read_error_stops_and_changes_nothing(loop, tmp_path, monkeypatch):
  _stand_in(monkeypatch)
  workdir = _copy(loop, 'straight', tmp_path)
  before = _tree_digest(workdir)
  real_restore, calls = ocp.CheckpointManager.restore, []

  def flaky(self, *args, **kwargs):
    calls.append(args)
    if len(calls) == 1:
      raise OSError(5, 'Input/output error')
    return real_restore(self, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', flaky)
  with pytest.raises(ckpt_lib.CheckpointReadError, match=r'^cannot read checkpoint \S+/6 '
                     r'\(OSError: \[Errno 5\] Input/output error\); nothing was changed'
                     ) as error:
    train.train_and_evaluate(loop['config'], str(workdir))
  assert '\n' not in str(error.value)
  assert _tree_digest(workdir) == before
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6']


def test_truncated_checkpoint_is_set_aside_and_the_run_resumes(loop, tmp_path, monkeypatch,
                                                                caplog):
  _stand_in(monkeypatch)
  workdir = _copy(loop, 'straight', tmp_path)
  with open(_largest_tensor_file(workdir / 'checkpoints' / '6'), 'r+b') as f:
    f.truncate(10)
  (workdir / 'checkpoints' / 'corrupt_6').mkdir()  # left by an earlier incident
  with caplog.at_level(logging.WARNING):
    state, summary = train.train_and_evaluate(loop['config'], str(workdir))
  assert re.search(r'Checkpoint step 6 is unreadable \(truncated or undecodable data '
                   r'\(OUT_OF_RANGE.*set aside as \S+corrupt_6_2, falling back to step 4',
                   caplog.text), caplog.text
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6', 'corrupt_6',
                                                         'corrupt_6_2']
  assert summary['top1'] == loop['straight']['top1'] and summary['step'] == 6
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(loop['straight_state'])),
                  jax.tree_util.tree_leaves(jax.device_get(state))):
    np.testing.assert_array_equal(a, b)
