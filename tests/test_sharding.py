"""Sharded training gives the numbers of one device: meshes, FSDP, BatchNorm, multi-process;
a stop on one process stops all at one step.

The multi-device checks run this file as a script in subprocesses with 8 simulated CPU
devices (`python tests/test_sharding.py equivalence OUT`), since the device count is fixed
when jax starts.
"""
import functools
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
# The demo model at small widths: the stage-4 MLP kernels (2**15 elements) are split by FSDP.
SMALL_MODEL = dict(hidden_sizes=(16, 32, 64, 128), mlp_sizes=(64, 128, 256, 256))
SMALL_FLAGS = ['--config.model.hidden_sizes=(16,32,64,128)',
               '--config.model.mlp_sizes=(64,128,256,256)']


def _env(devices: int) -> dict:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return {**os.environ, 'XLA_FLAGS': flags.strip(),
          'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO)}


def _small_config():
  from bhvit_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(str(REPO / 'configs' / 'demo.py'))
  config.model.update(SMALL_MODEL)
  config.batch_size = 16
  config.optim.update(schedule='constant', weight_decay=0.05, reg_beta=0.1)
  return config


def _flat(tree, prefix):
  import flax  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(tree, sep='/')
  return {f'{prefix}/{k}': np.asarray(v) for k, v in flat.items()}


def equivalence_worker(out_dir: str):
  """Trains STEPS steps on 1 device, data=8 and data=4 × fsdp=2; saves losses and variables."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_x64', True)  # sign decisions must not hinge on rounding
  from bhvit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import optim  # pylint: disable=g-import-not-at-top
  from bhvit_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import train  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  config = _small_config()
  model = model_lib.build(config.model, 'float64')
  tx, lr_fn, beta_fn = optim.build_optimizer(config.optim, global_batch_size=config.batch_size,
                                             total_steps=10)
  to64 = lambda x: x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x
  variables = jax.tree_util.tree_map(
      lambda x: to64(np.asarray(x)), model_lib.init_variables(model, jax.random.PRNGKey(0)))
  batches = [b for _, b in zip(range(STEPS), data_lib.build_train_iter(
      config, process_index=0, process_count=1))]
  # The LSQ calibration's statistics are global under any mesh as the BatchNorm ones; it is
  # done once here to save compiling it per mesh.
  variables, _ = jax.jit(functools.partial(model_lib.calibrate, model))(
      variables, batches[0]['image'])
  step_fn = train.make_train_step(model, tx, loss_config=config.loss, lr_fn=lr_fn,
                                  beta_fn=beta_fn)
  for name, data, fsdp, devices in (('single', 1, 1, jax.devices()[:1]),
                                    ('data8', 8, 1, jax.devices()),
                                    ('data4_fsdp2', 4, 2, jax.devices())):
    mesh = sharding_lib.make_mesh({'data': data, 'fsdp': fsdp}, devices)
    state = train.create_train_state(variables, tx)
    shardings = sharding_lib.tree_shardings(mesh, state)
    state = sharding_lib.put(state, shardings)
    rng = sharding_lib.put(jax.random.PRNGKey(1), sharding_lib.replicated(mesh))
    step = sharding_lib.jit_train_step(step_fn, mesh, shardings)
    losses = []
    for batch in batches:
      state, metrics = step(state, sharding_lib.global_batch(mesh, batch), rng, None)
      losses.append(float(metrics['loss']))
    adam = next(s for s in state.opt_state if hasattr(s, 'nu'))
    split = [str(s.spec) for s in jax.tree_util.tree_leaves(shardings.params)
             if s.spec != jax.sharding.PartitionSpec()]
    shard_shapes = {str(s.shard_shape(x.shape)) for x, s in zip(
        jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(shardings.params))
                    if s.spec != jax.sharding.PartitionSpec()}
    np.savez(os.path.join(out_dir, f'{name}.npz'), loss=np.array(losses),
             **_flat(jax.device_get(state.params), 'params'),
             **_flat(jax.device_get(state.batch_stats), 'batch_stats'),
             **_flat(jax.device_get(adam.nu), 'nu'))
    batch_devices = len(sharding_lib.global_batch(mesh, batches[0])['image'].sharding.device_set)
    with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
      json.dump({'split_params': split, 'shard_shapes': sorted(shard_shapes),
                 'batch_devices': batch_devices}, f)


@pytest.fixture(scope='session')
def equivalence(tmp_path_factory):
  out = tmp_path_factory.mktemp('equivalence')
  subprocess.run([sys.executable, __file__, 'equivalence', str(out)], env=_env(8), check=True,
                 timeout=600)
  return out


@pytest.mark.parametrize('mesh', ['data8', 'data4_fsdp2'])
def test_sharded_steps_equal_one_device(equivalence, mesh):
  single, sharded = (np.load(equivalence / f'{n}.npz') for n in ('single', mesh))
  info = json.loads((equivalence / f'{mesh}.json').read_text())
  assert info['batch_devices'] == 8  # every device holds 2 of the 16 rows
  assert len(set(single['loss'])) == STEPS  # three different batches, three losses
  assert sorted(single.files) == sorted(sharded.files)
  for key in single.files:
    # Leaves whose gradient is zero in exact arithmetic (biases before a BatchNorm) hold
    # float64 rounding noise of ~1e-12; Adam's nu of those is ~1e-30.
    atol = 1e-16 if key.startswith('nu/') else 1e-9
    np.testing.assert_allclose(sharded[key], single[key], rtol=1e-5, atol=atol, err_msg=key)
  # BatchNorm running means moved off their zero init: the statistics were really updated,
  # and equal the single-device ones, i.e. they are over the global batch (SyncBatchNorm).
  means = [single[k] for k in single.files if k.startswith('batch_stats/') and k.endswith('/mean')]
  assert means and all(np.abs(m).max() > 0 for m in means)
  if mesh == 'data4_fsdp2':
    assert info['split_params'] and all('fsdp' in s for s in info['split_params'])
    assert '(128, 128)' in info['shard_shapes']  # a [128, 256] MLP kernel, halved
  else:
    assert not info['split_params']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _train_command(workdir, *extra):
  return [sys.executable, '-m', 'bhvit_jax.train', '--config', str(REPO / 'configs' / 'demo.py'),
          '--workdir', str(workdir), '--config.total_steps=6', '--config.batch_size=16',
          '--config.optim.warmup_steps=1', '--config.checkpoint_every_steps=2',
          '--config.keep_checkpoints=10',
          '--config.eval_every_steps=0', '--config.log_every_steps=1', *SMALL_FLAGS, *extra]


def _train_records(workdir):
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


@pytest.fixture(scope='session')
def eight_device_run(tmp_path_factory):
  """The entry point on one process with 8 devices and mesh.data=8."""
  workdir = tmp_path_factory.mktemp('one_process')
  subprocess.run(_train_command(workdir, '--config.mesh.data=8'), env=_env(8), check=True,
                 cwd=REPO, timeout=600, capture_output=True)
  return workdir


def test_entry_point_runs_on_eight_devices(eight_device_run):
  records = _train_records(eight_device_run)
  assert [r['step'] for r in records if r['kind'] == 'train'] == [1, 2, 3, 4, 5, 6]
  final = [r for r in records if r['kind'] == 'eval']
  assert len(final) == 1 and final[0]['examples'] == 500  # every held-out digit counted once
  assert (eight_device_run / 'training.png').is_file()
  assert sorted(os.listdir(eight_device_run / 'checkpoints')) == ['2', '4', '6']


def _start_two_processes(workdir):
  """The entry point as processes 0 and 1 of a 2-process job, 4 CPU devices each.

  No persistent compilation cache: a process that finds its step there enters the first
  collective while the other still compiles, and gloo gives up after 30 s.
  """
  port = _free_port()
  return [subprocess.Popen(
      _train_command(workdir, f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                     '--config.distributed.num_processes=2',
                     f'--config.distributed.process_id={i}'),
      env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]


def _finish(procs) -> list:
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


@pytest.fixture(scope='session')
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('two_processes')
  outputs = _finish(_start_two_processes(workdir))
  assert 'held-out top-1' in outputs[0]
  return workdir


def test_two_processes_match_one_process(eight_device_run, two_process_run):
  workdir = two_process_run
  # gloo's all-reduce sums in another order than the in-process one, so float32 results
  # differ in the last bits; after a few steps a binary sign decision can flip on it and the
  # runs drift apart (steps 1-3 agree to 1e-6, step 4 by 0.3% in our runs). Steps 1-3 and
  # the step-2 checkpoint are therefore compared (float64 equivalence: the test above).
  ours, theirs = (
      [r for r in _train_records(w) if r['kind'] == 'train' and r['step'] <= 3]
      for w in (workdir, eight_device_run))
  assert [r['step'] for r in ours] == [1, 2, 3]
  for key in ('loss', 'grad_norm', 'train_top1'):
    np.testing.assert_allclose([r[key] for r in ours], [r[key] for r in theirs], rtol=1e-5,
                               err_msg=key)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6']
  got, want = (_checkpoint_params(w / 'checkpoints', 2) for w in (workdir, eight_device_run))
  assert sorted(got) == sorted(want)
  # Tensors whose gradient is a near-cancelling sum (e.g. a bias followed by BatchNorm) get
  # Adam steps of up to ~lr each from rounding noise alone: bound those by 2·lr per step.
  lr_bound = 2 * 2 * 2e-3 * 16 / 64
  tight = 0
  for key, value in want.items():
    if np.allclose(got[key], value, rtol=1e-5, atol=1e-6):
      tight += 1
    else:
      assert np.max(np.abs(got[key] - value)) <= lr_bound, key
  assert tight >= 0.8 * len(want), (tight, len(want))


def _last_train_step(workdir) -> int:
  try:
    return max((r['step'] for r in _train_records(workdir) if r['kind'] == 'train'), default=0)
  except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
    return 0


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """Only process 1 is signalled; both save one checkpoint of the same step and exit 0.
  (That a rerun from such a checkpoint ends bitwise where the uninterrupted run ends is
  tested in one process, tests/test_reliability.py: a second 2-process run costs minutes.)"""
  workdir = tmp_path / 'preempted'
  procs = _start_two_processes(workdir)
  deadline = time.time() + 600
  while _last_train_step(workdir) < 1:  # both processes are inside the loop
    assert all(p.poll() is None for p in procs) and time.time() < deadline, 'run ended early'
    time.sleep(0.005)
  for p in procs:
    p.send_signal(signal.SIGSTOP)
  procs[1].send_signal(signal.SIGTERM)
  for p in procs:
    p.send_signal(signal.SIGCONT)
  outputs = _finish(procs)
  stopped = [re.search(r'stopped at step (\d+); checkpoint saved', out) for out in outputs]
  assert all(stopped), outputs[0][-2000:]
  step = int(stopped[0].group(1))
  assert int(stopped[1].group(1)) == step and 1 <= step < 6, step
  saved = sorted(int(s) for s in os.listdir(workdir / 'checkpoints'))
  assert saved[-1] == step and saved == sorted({2, 4} & set(range(step)) | {step}), saved


def _checkpoint_params(directory, step):
  from bhvit_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  # The saving run's devices (8, two processes) are not here: read as host arrays.
  return _flat(ckpt_lib.load_variables(str(directory), step=step)['params'], 'params')


def test_mesh_shape_and_leaf_rule():
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from bhvit_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  assert sharding_lib.mesh_shape({'data': -1, 'fsdp': 2}, 8) == (4, 2)
  assert sharding_lib.mesh_shape({'data': -1}, 8) == (8, 1)
  with pytest.raises(ValueError, match=r'mesh.data=3 × mesh.fsdp=2 must equal .* \(8\)'):
    sharding_lib.mesh_shape({'data': 3, 'fsdp': 2}, 8)
  with pytest.raises(ValueError, match='mesh.fsdp=3 .* divide the 8 devices'):
    sharding_lib.mesh_shape({'data': -1, 'fsdp': 3}, 8)
  # Largest axis divisible by fsdp; small leaves, scalars and indivisible shapes replicate.
  assert sharding_lib.leaf_spec((3, 3, 32, 1024), 4) == P(None, None, None, 'fsdp')
  assert sharding_lib.leaf_spec((1024, 130), 4) == P('fsdp')
  assert sharding_lib.leaf_spec((257, 255), 2) == P()
  assert sharding_lib.leaf_spec((64, 64), 2) == P()  # 4096 < 2**14 elements
  assert sharding_lib.leaf_spec((), 2) == P()
  assert sharding_lib.leaf_spec((1024, 1024), 1) == P()


def test_single_process_defaults():
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bhvit_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'distributed': {'coordinator_address': '',
                                                      'num_processes': 0, 'process_id': -1}})
  assert not sharding_lib.initialize_distributed(config)
  mesh = sharding_lib.make_mesh({'data': -1, 'fsdp': 1})
  assert sharding_lib.process_batch_block(mesh, 4 * jax.device_count()) == (0, 1)


def test_each_process_reads_its_block_of_the_global_batch():
  """Two simulated hosts read disjoint halves that concatenate to the one-host batch."""
  from bhvit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = _small_config()
  whole = next(data_lib.build_train_iter(config, 5, process_index=0, process_count=1))
  halves = [next(data_lib.build_train_iter(config, 5, process_index=i, process_count=2))
            for i in range(2)]
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


if __name__ == '__main__':
  if sys.argv[1:2] == ['equivalence']:
    equivalence_worker(sys.argv[2])
  else:
    sys.exit(f'usage: {sys.argv[0]} equivalence OUT_DIR')
