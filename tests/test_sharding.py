"""Sharded training gives the numbers of one device: meshes, FSDP, BatchNorm, multi-process;
a stop on one process stops all at one step; a run resumes on another mesh or process count.

The multi-device checks run this file as a script in subprocesses with simulated CPU devices,
since the device count is fixed when jax starts: `equivalence OUT` (the real model, float64,
8 devices), `processes OUT PORT ID` (process ID of a 2-process job, 4 devices each) and
`topology OUT PROCESSES_OUT` (8 devices); the last two train a stand-in model.
"""
import functools
import itertools
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

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


# ------------------------------- stops and resumes across processes and meshes, stand-in ---
# The workers below run `train.train_and_evaluate` in-process with the stand-in model of
# tests/standin.py (it compiles in about a second; its hidden layer is wide enough for FSDP
# to split): the process boundary and the mesh are the point here, not the model. A run is 6
# steps of 16 8×8 digits with a checkpoint and a periodic evaluation every 2 steps.

STOP_AFTER = 3  # the runs stopped mid-run save a checkpoint of this step
# Another mesh or process count changes only the order in which the all-reduces sum, so a
# resumed run ends where the uninterrupted one does up to float32 rounding: every state leaf
# within TOPOLOGY_RTOL of its largest magnitude (measured: 6e-7 at most), except those driven
# by rounding noise. The conv bias before BatchNorm has a gradient of exactly zero, i.e. of
# rounding noise, which Adam normalizes into steps of up to about lr; the BatchNorm running
# mean carries that bias. Those differ by at most 2·lr per step after the resume (measured:
# 4e-4, one step's lr).
TOPOLOGY_RTOL = 2e-6
NOISE_DRIVEN = ('cov1/bias', 'batch_stats/norm/mean')
RESUMES = {'data4': (4, 1), 'data2_fsdp2': (2, 2), 'data1': (1, 1)}


def _loop_config():
  from bhvit_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(str(REPO / 'configs' / 'demo.py'))
  config.data.image_size = 8
  config.update(batch_size=16, total_steps=6, checkpoint_every_steps=2, keep_checkpoints=10,
                eval_every_steps=2, log_every_steps=1)
  config.optim.update(warmup_steps=2, reg_beta=0.1, weight_decay=0.05)
  return config


def _install_stand_in():
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import plots  # pylint: disable=g-import-not-at-top
  from standin import StandIn  # pylint: disable=g-import-not-at-top
  # FSDP splits the 8×2048 and 2048×10 kernels (2**14 elements or more) and their moments.
  model_lib.build = lambda *args: StandIn(hidden=2048)
  plots.plot_runs = lambda *args: None  # matplotlib costs seconds a run; not tested here


class _SignalAtStep:
  """The train iterator, sending this process SIGTERM as it hands out the batch of `step`."""

  def __init__(self, step, real, *args, **kwargs):
    self._step, self._it = step, real(*args, **kwargs)

  def __iter__(self):
    return self

  def __next__(self):
    if self._it.get_state()['step'] == self._step:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def _signal_in_evaluation(number, real):
  """build_eval_iter, sending this process SIGTERM as evaluation `number` (from 1) starts."""
  calls = itertools.count(1)

  def build(*args, **kwargs):
    if next(calls) == number:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
  return build


def _run(config, out, workdir, name, patches=None, **kwargs):
  """train_and_evaluate(config, OUT/workdir, **kwargs) with `patches` {name: function} in
  place of bhvit_jax.data's; saves the final state as OUT/name.npz and {'step', 'split_params'}
  as OUT/name.json (process 0). Returns the step it stopped at."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from bhvit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import train  # pylint: disable=g-import-not-at-top
  patches = patches or {}
  real = {key: getattr(data_lib, key) for key in patches}
  try:
    for key, value in patches.items():
      setattr(data_lib, key, value)
    state, summary = train.train_and_evaluate(config, str(out / workdir), **kwargs)
  finally:
    for key, value in real.items():
      setattr(data_lib, key, value)
  host = flax.serialization.to_state_dict(sharding_lib.fetch(state))
  if sharding_lib.is_primary():
    np.savez(out / f'{name}.npz', **_flat(host, 'state'))
    split = [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(state.params)
             if x.sharding.spec != jax.sharding.PartitionSpec()]
    (out / f'{name}.json').write_text(json.dumps({'step': summary['step'],
                                                  'split_params': split}))
  return summary['step']


def processes_worker(out_dir: str, port: str, process_id: str):
  """Process `process_id` of a 2-process job, 4 CPU devices each (mesh data=8).

  Runs: `straight`; `mid_run`, SIGTERMed on process 1 only before step STOP_AFTER ends (its
  checkpoints copied as `mid_run_stopped`), then rerun; `in_eval`, SIGTERMed on process 0
  only as its second periodic evaluation starts, then rerun. Writes OUT/steps_<id>.json, the
  step each run stopped at on this process.
  """
  from bhvit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from bhvit_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  _install_stand_in()
  out, process_id = pathlib.Path(out_dir), int(process_id)
  config = _loop_config()
  config.distributed.update(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                            process_id=process_id)
  only_on = lambda i, patches: patches if process_id == i else None
  steps = {'straight': _run(config, out, 'straight', 'straight')}
  steps['mid_run'] = _run(config, out, 'mid_run', 'mid_run', only_on(1, {
      'build_train_iter': functools.partial(_SignalAtStep, STOP_AFTER - 1,
                                            data_lib.build_train_iter)}))
  if sharding_lib.is_primary():
    shutil.copytree(out / 'mid_run', out / 'mid_run_stopped')
  sharding_lib.barrier('mid_run_copied')
  steps['mid_run_rerun'] = _run(config, out, 'mid_run', 'mid_run_rerun')
  steps['in_eval'] = _run(config, out, 'in_eval', 'in_eval', only_on(0, {
      'build_eval_iter': _signal_in_evaluation(2, data_lib.build_eval_iter)}))
  steps['in_eval_rerun'] = _run(config, out, 'in_eval', 'in_eval_rerun')
  (out / f'steps_{process_id}.json').write_text(json.dumps(steps))


def topology_worker(out_dir: str, processes_dir: str):
  """One process, 8 CPU devices: `straight` on data=8 and `stopped` there after STOP_AFTER
  steps; the stopped run resumed on each mesh of RESUMES, and the 2-process run's `mid_run`
  checkpoint (PROCESSES_DIR/mid_run_stopped) resumed here on data=4 (`processes_2to1`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bhvit_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  _install_stand_in()
  out = pathlib.Path(out_dir)
  config = _loop_config()

  def mesh(data, fsdp):
    config.mesh.update(data=data, fsdp=fsdp)  # recorded in config.json; free to change
    return sharding_lib.make_mesh(config.mesh, jax.devices()[:data * fsdp])
  _run(config, out, 'straight', 'straight', mesh=mesh(8, 1))
  _run(config, out, 'stopped', 'stopped', mesh=mesh(8, 1),
       should_stop=lambda step: step == STOP_AFTER)
  for name, (data, fsdp) in RESUMES.items():
    shutil.copytree(out / 'stopped', out / name)
    _run(config, out, name, name, mesh=mesh(data, fsdp))
  shutil.copytree(pathlib.Path(processes_dir) / 'mid_run_stopped', out / 'processes_2to1')
  _run(config, out, 'processes_2to1', 'processes_2to1', mesh=mesh(4, 1))


@pytest.fixture(scope='module')
def processes(tmp_path_factory):
  """processes_worker's outputs. No persistent compilation cache: a process that finds its
  step there enters the first collective while the other still compiles, and gloo gives up
  after 30 s."""
  out = tmp_path_factory.mktemp('processes')
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, __file__, 'processes', str(out), port, str(i)],
                            env=_env(4), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, output in zip(procs, outputs):
    assert p.returncode == 0, output[-3000:]
  return out


@pytest.fixture(scope='module')
def topology(processes, tmp_path_factory):
  out = tmp_path_factory.mktemp('topology')
  subprocess.run([sys.executable, __file__, 'topology', str(out), str(processes)], env=_env(8),
                 check=True, timeout=600)
  return out


def _state(out, name):
  with np.load(out / f'{name}.npz') as npz:
    return dict(npz)


def _records(workdir, kind):
  """metrics.jsonl's records of `kind`, less the throughput (a timing)."""
  return [{k: v for k, v in r.items() if k != 'images_per_sec'}
          for r in _train_records(workdir) if r['kind'] == kind]


def _assert_bitwise(got, want):
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def _steps_of(out):
  return [json.loads((out / f'steps_{i}.json').read_text()) for i in range(2)]


def test_sigterm_to_process_1_mid_run_stops_both_at_one_step(processes):
  """Both processes stop at the same step and save one checkpoint of it; the rerun ends
  bitwise where the uninterrupted 2-process run ends."""
  for steps in _steps_of(processes):
    assert steps['straight'] == 6 and steps['mid_run'] == STOP_AFTER, steps
    assert steps['mid_run_rerun'] == 6, steps
  assert sorted(os.listdir(processes / 'mid_run_stopped' / 'checkpoints')) == ['2', '3']
  _assert_bitwise(_state(processes, 'mid_run_rerun'), _state(processes, 'straight'))
  assert _records(processes / 'mid_run', 'train') == _records(processes / 'straight', 'train')


def test_sigterm_to_process_0_in_a_periodic_evaluation_repeats_it(processes):
  for steps in _steps_of(processes):
    assert steps['in_eval'] == 4 and steps['in_eval_rerun'] == 6, steps
  ours, theirs = (_records(processes / w, 'eval') for w in ('in_eval', 'straight'))
  # The cut evaluation wrote nothing; the step-4 record is the rerun's repetition.
  assert [r['step'] for r in ours] == [2, 4, 6]
  assert ours == theirs
  _assert_bitwise(_state(processes, 'in_eval_rerun'), _state(processes, 'straight'))


@pytest.mark.parametrize('name', [*RESUMES, 'processes_2to1'])
def test_resume_on_another_topology_continues_the_run(topology, processes, name):
  """A checkpoint of step 3 (8 devices in one process, or 2 processes × 4) resumed on fewer
  devices or processes continues the same global data order and ends where the
  uninterrupted run does, up to float32 rounding (TOPOLOGY_RTOL, NOISE_DRIVEN)."""
  source = processes if name == 'processes_2to1' else topology
  identity = json.loads((topology / name / 'config.json').read_text())
  data, fsdp = RESUMES.get(name, (4, 1))
  assert identity['mesh'] == {'data': data, 'fsdp': fsdp} and identity['process_count'] == 1
  assert identity['changes'] == []  # mesh and process count are not trajectory keys
  split = json.loads((topology / f'{name}.json').read_text())['split_params']
  assert (fsdp > 1) == bool(split) and all('fsdp' in s for s in split), split
  ours, theirs = (_records(w, 'train') for w in (topology / name, source / 'straight'))
  assert [r['step'] for r in ours] == [1, 2, 3, 4, 5, 6]
  for key in ('loss', 'grad_norm', 'train_top1', 'lr'):
    np.testing.assert_allclose([r[key] for r in ours], [r[key] for r in theirs], rtol=1e-5,
                               err_msg=key)
  noise_bound = 2 * sum(r['lr'] for r in theirs if r['step'] > STOP_AFTER)
  got, want = _state(topology, name), _state(source, 'straight')
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if any(part in key for part in NOISE_DRIVEN):
      np.testing.assert_allclose(got[key], value, rtol=0, atol=noise_bound, err_msg=key)
    else:
      np.testing.assert_allclose(got[key], value, rtol=0, err_msg=key,
                                 atol=TOPOLOGY_RTOL * np.max(np.abs(value)))


@pytest.mark.parametrize('mixup', [0.0, 0.8])
def test_resume_on_another_process_count_warns_only_with_mixing(tmp_path, caplog, mixup):
  """Mixup/cutmix pair each process's rows: a resume on another process count is allowed, and
  warned about where it changes the mixed pairs."""
  from bhvit_jax import run_identity  # pylint: disable=g-import-not-at-top
  config = _loop_config()
  config.augment.mixup_alpha = mixup
  run_identity.record(config, str(tmp_path), None, [])
  path = tmp_path / run_identity.FILENAME
  path.write_text(json.dumps({**json.loads(path.read_text()), 'process_count': 2}))
  assert run_identity.check(config, str(tmp_path), resuming_from=3) == []
  warned = [r.getMessage() for r in caplog.records if 'mixed pairs' in r.getMessage()]
  assert warned == ([] if not mixup else [
      "resuming step 3 on 1 processes instead of 2: mixup/cutmix mix each process's rows, "
      'so the mixed pairs change from here on'])


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
  WORKERS = {'equivalence': equivalence_worker, 'processes': processes_worker,
             'topology': topology_worker}
  if sys.argv[1:2] and sys.argv[1] in WORKERS:
    WORKERS[sys.argv[1]](*sys.argv[2:])
  else:
    sys.exit(f'usage: {sys.argv[0]} equivalence OUT | processes OUT PORT ID | '
             'topology OUT PROCESSES_OUT')
