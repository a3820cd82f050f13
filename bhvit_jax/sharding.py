"""Device meshes, shardings and multi-host start-up for training with `jax.jit`.

The mesh has two axes: 'data' (replicas of the model) and 'fsdp' (parameters and optimizer
state split across devices). Every device holds a slice of the global batch: the batch axis is
sharded over both axes, so under `jit` means over the batch (loss, BatchNorm statistics, LSQ
calibration) are over the global batch, as PyTorch's SyncBatchNorm. Each process loads only
the rows of the global batch its devices hold (`process_batch_block`) and assembles global
arrays with `jax.make_array_from_process_local_data`.
"""
import logging
import os
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

from bhvit_jax import config_lib

PyTree = Any
AXES = ('data', 'fsdp')
BATCH_SPEC = PartitionSpec(AXES)  # the leading (batch) axis over all devices
FSDP_MIN_SIZE = 2**14  # smaller leaves are replicated: splitting them only adds collectives


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) from config.mesh; data=-1 takes all devices left after fsdp."""
  fsdp = int(mesh_config.get('fsdp', 1) or 1)
  data = int(mesh_config.get('data', -1))
  if fsdp < 1 or num_devices % fsdp:
    raise config_lib.UserError(f'mesh.fsdp={fsdp} must be >= 1 and divide the {num_devices} '
                               'devices')
  if data == -1:
    data = num_devices // fsdp
  if data < 1 or data * fsdp != num_devices:
    raise config_lib.UserError(f'mesh.data={data} × mesh.fsdp={fsdp} must equal the number of '
                               f'devices ({num_devices}); use mesh.data=-1 for "all remaining '
                               'devices"')
  return data, fsdp


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh with axes ('data', 'fsdp') over `devices` (default: all devices of all processes).

  Auto axis types: shardings are given at the jit boundary and propagated inside.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
  """'fsdp' on the largest axis divisible by `fsdp` for leaves of >= min_size elements."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  candidates = [axis for axis, n in enumerate(shape) if n % fsdp == 0]
  if not candidates:
    return PartitionSpec()
  axis = max(candidates, key=lambda a: (shape[a], -a))
  return PartitionSpec(*([None] * axis + ['fsdp']))


def tree_shardings(mesh: Mesh, tree: PyTree) -> PyTree:
  """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) by `leaf_spec`.

  Adam's mu/nu have the params' shapes, so they are split the same way; scalars (step,
  counters) are replicated.
  """
  fsdp = mesh.shape['fsdp']
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), fsdp)), tree)


def put(tree: PyTree, shardings: PyTree) -> PyTree:
  """Global arrays of `tree`'s values (the same on every process) with `shardings`.

  Works for host values and for arrays committed elsewhere, in one or many processes.
  """
  def place(x, sharding):
    if isinstance(x, jax.Array) and x.is_fully_addressable is False:
      return jax.device_put(x, sharding)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree_util.tree_map(place, tree, shardings)


def process_batch_block(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """(block index, block count): this process holds rows [i·B/n, (i+1)·B/n) of the batch.

  The data pipeline reads exactly that block (its `process_index`/`process_count`), so the
  global batch is the same whatever the device order of the mesh.
  """
  num_devices = mesh.devices.size
  if global_batch % num_devices:
    raise config_lib.UserError(f'batch size {global_batch} is not divisible by the '
                               f'{num_devices} devices of the mesh {dict(mesh.shape)}')
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = sorted({(s[0].start or 0, s[0].stop or global_batch) for s in indices.values()})
  start, stop = rows[0][0], rows[-1][1]
  contiguous = all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
  size = stop - start
  if not contiguous or global_batch % size or start % size:
    raise ValueError(f'the devices of process {jax.process_index()} hold batch rows {rows}, '
                     'not one aligned block; build the mesh with devices grouped by process')
  return start // size, global_batch // size


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """{'image': [B, H, W, 3], ...} global arrays from this process's block of rows."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def fetch(tree: PyTree) -> PyTree:
  """Host values of (replicated or sharded) global arrays, on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(get, tree)


# Environment variables that mean "this process is one of several" for jax's cluster detection.
_MULTI_PROCESS_ENV = ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'SLURM_NTASKS',
                      'OMPI_COMM_WORLD_SIZE')


def _env_says_multi_process() -> bool:
  for name in _MULTI_PROCESS_ENV:
    value = os.environ.get(name, '')
    if name == 'TPU_WORKER_HOSTNAMES':
      if len(value.split(',')) > 1:
        return True
    elif name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
      if value.isdigit() and int(value) > 1:
        return True
    elif value:
      return True
  return False


def initialize_distributed(config) -> bool:
  """Starts jax's multi-process runtime when configured or when the environment is a cluster.

  `config.distributed` (optional): coordinator_address ('host:port'), num_processes (0: auto),
  process_id (-1: auto). With none set, it starts only when the environment names several
  processes (TPU pod slices, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS), letting jax detect
  the rest. Must run before anything touches a device. Returns True when multi-process.
  """
  if jax.distributed.is_initialized():
    return True
  dist = config.get('distributed') or {}
  kwargs = {}
  if dist.get('coordinator_address'):
    kwargs['coordinator_address'] = dist['coordinator_address']
  if int(dist.get('num_processes', 0) or 0) > 0:
    kwargs['num_processes'] = int(dist['num_processes'])
  if int(dist.get('process_id', -1)) >= 0:
    kwargs['process_id'] = int(dist['process_id'])
  if not kwargs and not _env_says_multi_process():
    return False
  jax.distributed.initialize(**kwargs)
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any: an all-reduce that every process must
  call at the same point (free with one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def reached_preemption_point(step: int) -> bool:
  """jax's preemption sync point (the platform's notice, agreed by all processes) at `step`;
  False where the preemption service does not run (one process, or disabled)."""
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except RuntimeError:  # the service is disabled
    return False


def barrier(name: str):
  """Waits until every process gets here (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
  """Process 0 writes logs, metrics files and plots."""
  return jax.process_index() == 0


def jit_train_step(train_step, mesh: Mesh, state_shardings: PyTree,
                   teacher_shardings: PyTree = None):
  """`train.make_train_step`'s function jitted for `mesh`, the state donated.

  Call it as `step(state, batch, rng, teacher_variables)` (None without a teacher). The
  state follows `state_shardings`, batch rows are split over all devices, rng and metrics
  are replicated.
  """
  rep = replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(state_shardings, batch_sharding(mesh), rep, teacher_shardings),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))
