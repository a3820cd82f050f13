"""Orbax checkpoints of a training run: atomic saves, keep-K, fall back past a corrupt latest.

A checkpoint holds two items: 'state' (every array of the train state as a nested dict, via
`flax.serialization.to_state_dict`) and 'meta' (JSON: data iterator state, metrics history,
anything else the loop needs). Orbax writes into a temporary directory and renames it when
complete, and deletes checkpoints beyond `keep` only after the new one is committed.

Restoring tells corruption from trouble: only a checkpoint that is demonstrably broken (an
item directory missing, metadata that is not JSON, a tensor file truncated or undecodable) is
set aside; any other failure (I/O, memory, ...) raises `CheckpointReadError` and changes
nothing, so a transient error never costs a checkpoint.
"""
import base64
import contextlib
import json
import logging
import os
from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bhvit_jax import config_lib
from bhvit_jax import convert
from bhvit_jax import finetune
from bhvit_jax import model as model_lib
from bhvit_jax import sharding as sharding_lib
from bhvit_jax.mismatch import ShapeMismatchError, check_shapes

PyTree = Any


class CheckpointReadError(RuntimeError):
  """A checkpoint could not be read for a reason that may pass (I/O, memory); nothing on disk
  was changed."""


# TensorStore's status codes for bytes that cannot be what was written: a file cut short
# (OUT_OF_RANGE: the byte range the index promises is missing) or garbled (DATA_LOSS).
_BROKEN_STATUSES = ('DATA_LOSS', 'OUT_OF_RANGE')
_ITEMS = ('state', 'meta')


def _causes(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def corruption(path: str, error: BaseException) -> Optional[str]:
  """Why checkpoint directory `path` is broken for good, or None when `error` may be
  transient (or is not understood)."""
  missing = [item for item in _ITEMS if not os.path.isdir(os.path.join(path, item))]
  if missing:
    return f'incomplete: item directories {missing} missing'
  for cause in _causes(error):
    if isinstance(cause, MemoryError):
      return None
    if isinstance(cause, json.JSONDecodeError):
      return f'undecodable metadata ({cause})'
    if isinstance(cause, ValueError) and str(cause).startswith(_BROKEN_STATUSES):
      return f'truncated or undecodable data ({str(cause).splitlines()[0][:300]})'
  return None


def _encode_meta(value):
  """JSON-safe meta: bytes (e.g. a grain iterator state) become {'__bytes__': base64}."""
  if isinstance(value, bytes):
    return {'__bytes__': base64.b64encode(value).decode('ascii')}
  if isinstance(value, dict):
    return {k: _encode_meta(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_encode_meta(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, '__jax_array__'):
    return np.asarray(value).tolist()
  return value


def _decode_meta(value):
  if isinstance(value, dict):
    if set(value) == {'__bytes__'}:
      return base64.b64decode(value['__bytes__'])
    return {k: _decode_meta(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode_meta(v) for v in value]
  return value


def _without_absent_empty(target, stored):
  """`target` without the empty subtrees the stored tree lacks, which orbax would reject: an
  empty collection added to the train state after the checkpoint was written (the EMA fields,
  empty when config.ema_decay is 0) restores as empty."""
  if not isinstance(target, dict) or not isinstance(stored, dict):
    return target
  return {k: _without_absent_empty(v, stored.get(k)) for k, v in target.items()
          if k in stored or jax.tree_util.tree_leaves(v)}


def _refill(restored, target):
  """`restored` with the subtrees of `target` it lacks (those `_without_absent_empty` left out)."""
  if not isinstance(target, dict):
    return restored
  return {k: _refill(restored[k], v) if k in restored else v for k, v in target.items()}


def _item_handlers():
  # Explicit handlers so a fresh manager can read metadata before any save or restore.
  return {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}


BEST_DIR = 'checkpoints_best'  # beside WORKDIR/checkpoints; read as `WORKDIR:best`


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
  """Orbax names its barriers after the step: the best and the periodic checkpoint of one step
  save concurrently, so each manager prefixes its own (else, with several processes, the
  second waits at a barrier "already ongoing" and the save times out)."""
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class BestCheckpoint:
  """The weights (`TrainState.weights()`) of the evaluation with the highest top-1 so far.

  A separate one-checkpoint orbax directory, so the rotation of the periodic checkpoints
  never deletes it. A new evaluation replaces it only when strictly better (ties keep the
  earlier step, as an argmax over the logged records does); orbax removes the previous one
  only after the new one is committed. Its meta holds {'step', 'top1'}; the record to beat is
  read back on resume.
  """

  def __init__(self, directory: str, enabled: bool = True):
    self.directory = os.path.abspath(directory)
    self.enabled = bool(enabled)
    self.top1 = None
    if not self.enabled:
      return
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           cleanup_tmp_directories=True,
                                           multiprocessing_options=_barriers('best'))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_item_handlers())
    step = self._manager.latest_step()
    if step is not None:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      self.top1 = float(meta['meta']['top1'])

  def update(self, step: int, top1: float, weights: PyTree) -> bool:
    """Saves `weights` as the best when `top1` beats the best so far; True when saved."""
    if not self.enabled or (self.top1 is not None and top1 <= self.top1):
      return False
    if step in self._manager.all_steps():
      return False  # a rerun of that evaluation
    self.top1 = float(top1)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(weights)),
        meta=ocp.args.JsonSave({'step': int(step), 'top1': float(top1)}))
    return self._manager.save(int(step), args=args, force=True)

  def close(self):
    if self.enabled:
      self._manager.close()


class Checkpointer:
  """Saves every `every_steps` steps keeping `keep`, restores the newest readable one."""

  def __init__(self, directory: str, every_steps: int, keep: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(every_steps), 1), max_to_keep=max(int(keep), 1), create=True,
        cleanup_tmp_directories=True, multiprocessing_options=_barriers('train'))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_item_handlers())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, meta: dict, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `state` and JSON `meta`; True when one was started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                              meta=ocp.args.JsonSave(_encode_meta(meta)))
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, target: PyTree) -> Optional[Tuple[int, PyTree, dict]]:
    """Restores the newest readable checkpoint into the structure of `target`.

    A demonstrably broken checkpoint (`corruption`) is set aside by process 0 (renamed
    `corrupt_<step>`, or `corrupt_<step>_<n>` when that exists) with a warning and the previous
    one is tried. Any other read failure raises CheckpointReadError, leaving every file in
    place; a shape mismatch raises ShapeMismatchError. Collective: every process calls it.

    Returns:
      (step, state, meta), or None when there is no readable checkpoint.
    """
    target_dict = flax.serialization.to_state_dict(target)
    steps = sorted(self._manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        stored = self._manager.item_metadata(step)['state']
        stored = stored.tree if hasattr(stored, 'tree') else stored
        check_shapes(stored, target_dict, f'checkpoint {self.directory} step {step}')
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_without_absent_empty(target_dict, stored)),
            meta=ocp.args.JsonRestore()))
      except ShapeMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside_or_raise(step, e, steps[i + 1] if i + 1 < len(steps) else None)
        continue
      state = flax.serialization.from_state_dict(target, _refill(restored['state'], target_dict))
      return step, state, _decode_meta(restored['meta'])
    return None

  def _set_aside_or_raise(self, step: int, error: Exception, fallback: Optional[int]):
    path = os.path.join(self.directory, str(step))
    why = corruption(path, error)
    # Collective: every process has stopped reading and agrees before anything is renamed.
    if sharding_lib.any_process(why is None):
      first_line = (str(error).splitlines() or [''])[0][:300]
      cause = (f'{type(error).__name__}: {first_line}' if why is None
               else 'another process could not read it')
      raise CheckpointReadError(
          f'cannot read checkpoint {path} ({cause}); nothing was changed: fix the cause and '
          'rerun to resume from it') from error
    aside = os.path.join(self.directory, f'corrupt_{step}')
    n = 1
    while os.path.exists(aside):
      n += 1
      aside = os.path.join(self.directory, f'corrupt_{step}_{n}')
    logging.warning('Checkpoint step %d is unreadable (%s); set aside as %s, falling back to %s.',
                    step, why, aside, 'none' if fallback is None else f'step {fallback}')
    if jax.process_index() == 0:
      os.replace(path, aside)
    sharding_lib.barrier(f'checkpoint_set_aside_{step}')
    self._manager.reload()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


@contextlib.contextmanager
def _quiet_absl():
  """Hides orbax's warnings that a read-only manager is read-only (it is asked to be)."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def load_variables(directory: str, step: Optional[int] = None, ema: bool = False) -> dict:
  """{'params', 'batch_stats', 'quant_state'} of checkpoint `step` (default: the newest).

  `directory` is a checkpoint directory or a training workdir containing `checkpoints/`.
  `ema`: the run's exponential moving average of the weights and BatchNorm statistics
  instead of the live ones (config.ema_decay > 0).
  """
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  with _quiet_absl():
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_handlers=_item_handlers(),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise config_lib.UserError(f'no orbax checkpoint {"" if step is None else step} found in '
                               f'{directory}')
  try:
    stored = manager.item_metadata(step)['state']
    stored = stored.tree if hasattr(stored, 'tree') else stored
    # Host arrays as the restore target: the devices (or processes) that saved the checkpoint
    # need not exist here.
    target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), stored)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']
  except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore errors)
    message = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise config_lib.UserError(f'unreadable orbax checkpoint {step} in {directory}: '
                               f'{message}') from e
  finally:
    manager.close()
  variables = restored.get('train', restored)  # train.py saves {'train': TrainState, 'rng': key}
  if ema:
    if not variables.get('ema_params'):
      raise config_lib.UserError(f'checkpoint {directory} step {step} holds no EMA weights '
                                 '(trained with config.ema_decay=0)')
    variables = {**variables, 'params': variables['ema_params'],
                 'batch_stats': variables.get('ema_batch_stats')}
  return {k: jax.tree_util.tree_map(np.asarray, variables.get(k) or {})
          for k in ('params', 'batch_stats', 'quant_state')}


FLOAT_FILES = ('.msgpack', '.pth', '.pt', '.npz')


def split_spec(spec: str) -> Tuple[str, Optional[int]]:
  """'WORKDIR:1200' -> (WORKDIR, 1200); 'WORKDIR:best' -> (WORKDIR/checkpoints_best, None);
  'WORKDIR:latest' and anything else -> (path, None)."""
  path, sep, suffix = str(spec).rpartition(':')
  if sep and os.path.isdir(path):
    if suffix.isdigit():
      return path, int(suffix)
    if suffix == 'latest':
      return path, None
    if suffix == 'best':
      best = os.path.join(path, BEST_DIR)
      if not os.path.isdir(best):
        raise config_lib.UserError(f'{spec}: {path} has no {BEST_DIR}/ (no evaluation ran, '
                                   'or config.keep_best_checkpoint was False)')
      return best, None
    raise config_lib.UserError(f"unknown checkpoint step {suffix!r} in {spec} (expected "
                               "WORKDIR, WORKDIR:<step>, WORKDIR:best or WORKDIR:latest)")
  return str(spec), None


def is_packed_file(spec: str) -> bool:
  """A file of tools/export_packed.py (any name that no float format claims)."""
  return os.path.isfile(spec) and not str(spec).endswith(FLOAT_FILES)


def _read_variables(path: str, step: Optional[int], model, adapt: bool, ema: bool) -> dict:
  if not os.path.exists(path):
    raise config_lib.UserError(f'checkpoint not found ({path})')
  if os.path.isdir(path):
    return load_variables(path, step, ema)
  if ema:
    raise config_lib.UserError(f'{path}: EMA weights are read from a training run directory '
                               'only')
  if path.endswith('.msgpack'):
    return convert.load_flax_variables(path)
  if path.endswith(('.pth', '.pt', '.npz')):
    state = convert.load_torch_file(path)
    return convert.torch_to_flax(state, finetune.source_model(state, model) if adapt else model)
  raise config_lib.UserError(f'{path}: a bit-packed file holds no latent weights; expected a '
                             f'run directory, WORKDIR:<step> or a {"/".join(FLOAT_FILES)} file')


def load_any(spec: str, model, reference: Optional[dict] = None, adapt: bool = False,
             ema: bool = False) -> dict:
  """Float variables of `model` from any checkpoint the project reads.

  `spec`: a training run or checkpoints directory (newest step), `WORKDIR:<step>`,
  `WORKDIR:best` (the best evaluation's weights), a Flax `.msgpack`, or a PyTorch
  `.pth`/`.pt`/`.npz` state dict of the official BHViT; `ema`: the run's EMA weights. `reference`
  (variables or `jax.eval_shape` structs; default: the model's) fixes the collections and
  shapes; collections the checkpoint lacks keep the reference's. `adapt` (fine-tuning, as
  `init_from` does) first fits another class count or resolution (`finetune.adapt_variables`).
  Raises ShapeMismatchError with the one mismatch listing.
  """
  path, step = split_spec(spec)
  read = _read_variables(path, step, model, adapt, ema)  # before tracing: bad files fail fast
  if reference is None:
    reference = jax.eval_shape(lambda rng: model_lib.init_variables(model, rng),
                               jax.random.PRNGKey(0))
  loaded = {k: v for k, v in read.items() if k in reference and v}
  if 'params' not in loaded:
    raise config_lib.UserError(f'checkpoint {spec} contains no params')
  if adapt:
    loaded = finetune.adapt_variables(loaded, reference)
  check_shapes(loaded, {k: reference[k] for k in loaded}, f'checkpoint {spec}')
  merged = dict(reference)
  merged.update({k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in loaded.items()})
  absent = [k for k, v in merged.items()
            if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(v))]
  if absent:
    raise config_lib.UserError(f'checkpoint {spec} lacks the variable collections {absent}')
  return merged
