"""WORKDIR/config.json: what a run is (resolved config, versions, mesh, processes).

A resumed run must be the run its checkpoints belong to: a change to any key that alters the
trajectory (batch size, length, seed, data, model, optimizer, loss, ...) is refused unless
`config.allow_config_change` is set, in which case it is logged and recorded in the file's
`changes`. The keys of `FREE_KEYS` (and everything under them) only say how the run is logged,
checkpointed, evaluated or laid out on devices, and may change on any restart. A change of
process count with mixup/cutmix on is allowed but warned about: those mix each process's rows.
"""
import importlib.metadata
import json
import logging
import math
import os
import platform

import jax

from bhvit_jax import augment as augment_lib
from bhvit_jax import config_lib
from bhvit_jax import sharding as sharding_lib

FILENAME = 'config.json'
FREE_KEYS = ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
             'keep_checkpoints', 'max_nonfinite_in_row', 'allow_config_change', 'init_from',
             'eval_batch_size', 'data.num_workers', 'data.data_dir', 'mesh', 'distributed')
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'bhvit_jax')


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _strict(value):
  """`value` with non-finite floats as strings ('nan', 'inf'): strict JSON, and equal to
  itself."""
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_strict(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _is_free(key: str) -> bool:
  return any(key == free or key.startswith(free + '.') for free in FREE_KEYS)


def changed_keys(stored: dict, current: dict) -> dict:
  """{dotted key: (stored value, current value)} of the trajectory keys that differ."""
  old, new = _flat(stored), _flat(current)
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if not _is_free(k) and old.get(k) != new.get(k)}


def _versions() -> dict:
  versions = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _config_record(config) -> dict:
  return _strict(json.loads(config.to_json_best_effort()))


def describe(config, mesh) -> dict:
  """The JSON record of this start of the run."""
  return {'config': _config_record(config), 'versions': _versions(),
          'mesh': {k: int(v) for k, v in mesh.shape.items()} if mesh is not None else None,
          'process_count': jax.process_count(), 'device_count': jax.device_count(),
          'platform': jax.devices()[0].platform}


def check(config, workdir: str, resuming_from) -> list:
  """Raises UserError when a resumed run changes trajectory keys and that is not allowed.

  `resuming_from`: the step of the newest checkpoint, or None for a fresh run. Returns the
  run's list of recorded changes, this one appended (for `record`).
  """
  path = os.path.join(workdir, FILENAME)
  if resuming_from is None or not os.path.isfile(path):
    return []
  with open(path) as f:
    stored = json.load(f)
  _warn_if_mixing_moves(config, stored.get('process_count'), resuming_from)
  changed = changed_keys(stored['config'], _config_record(config))
  if not changed:
    return stored.get('changes', [])
  listing = ', '.join(f'{k} ({old!r} -> {new!r})' for k, (old, new) in changed.items())
  if not config.get('allow_config_change'):
    raise config_lib.UserError(
        f'{workdir} holds a run with another configuration: {listing}; resuming would change '
        'its trajectory. Use another --workdir, or pass --config.allow_config_change=True to '
        'resume anyway')
  logging.warning('resuming step %d with a changed configuration: %s', resuming_from, listing)
  return stored.get('changes', []) + [
      {'step': resuming_from, 'changed': {k: list(v) for k, v in changed.items()}}]


def _warn_if_mixing_moves(config, stored_processes, step) -> None:
  """Mixup/cutmix pair each process's rows (augment.batch_rng): on another process count the
  mixed pairs change from the resumed step on, though the data order does not."""
  augment = config.get('augment')
  if (augment is None or not augment_lib.mixing_active(augment)
      or stored_processes in (None, jax.process_count())):
    return
  logging.warning('resuming step %d on %d processes instead of %d: mixup/cutmix mix each '
                  "process's rows, so the mixed pairs change from here on", step,
                  jax.process_count(), stored_processes)


def record(config, workdir: str, mesh, changes: list) -> None:
  """Writes WORKDIR/config.json (process 0; atomic, as other processes may be reading it)."""
  if not sharding_lib.is_primary():
    return
  path = os.path.join(workdir, FILENAME)
  with open(path + '.tmp', 'w') as f:
    json.dump({**describe(config, mesh), 'changes': changes}, f, indent=1, allow_nan=False)
  os.replace(path + '.tmp', path)
