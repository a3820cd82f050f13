"""Orbax checkpoints of a training run: atomic saves, keep-K, fall back past a corrupt latest.

A checkpoint holds two items: 'state' (every array of the train state as a nested dict, via
`flax.serialization.to_state_dict`) and 'meta' (JSON: data iterator state, metrics history,
anything else the loop needs). Orbax writes into a temporary directory and renames it when
complete, and deletes checkpoints beyond `keep` only after the new one is committed.
"""
import base64
import logging
import os
from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bhvit_jax import config_lib

PyTree = Any


class ShapeMismatchError(config_lib.UserError):
  """The checkpoint was written by a model/optimizer of another shape."""


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


def raise_mismatch(what: str, problems: list):
  """Raises ShapeMismatchError with the one mismatch listing every loader uses (no-op when
  `problems` is empty): one line per name, at most 40 shown."""
  if not problems:
    return
  shown = problems[:40] + ([f'  ... and {len(problems) - 40} more'] if len(problems) > 40 else [])
  raise ShapeMismatchError(
      f'{what} does not match the current model/optimizer configuration '
      f'({len(problems)} mismatches); was it written with another model config? Nothing on '
      'disk was changed.\n' + '\n'.join(shown))


def mismatch_lines(stored: dict, target: dict) -> list:
  """Listing lines for flat {name: shape} dicts of a checkpoint and of the model."""
  lines = [f'  {k}: checkpoint {stored[k]} vs model {target[k]}'
           for k in sorted(stored.keys() & target.keys()) if stored[k] != target[k]]
  lines += [f'  {k}: missing in checkpoint' for k in sorted(target.keys() - stored.keys())]
  return lines + [f'  {k}: not in the model' for k in sorted(stored.keys() - target.keys())]


def _flat_shapes(tree) -> dict:
  flat = flax.traverse_util.flatten_dict(tree, sep='/') if isinstance(tree, dict) else {}
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, 'shape')}


def check_shapes(stored: dict, target: dict, what: str):
  """Raises ShapeMismatchError listing every leaf whose shape or presence differs."""
  raise_mismatch(what, mismatch_lines(_flat_shapes(stored), _flat_shapes(target)))


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
                                           cleanup_tmp_directories=True)
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
        cleanup_tmp_directories=True)
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

    A checkpoint that fails to read is moved aside (renamed `corrupt_<step>`) with a warning
    and the previous one is tried. A shape mismatch is not corruption: it raises.

    Returns:
      (step, state, meta), or None when there is no readable checkpoint.
    """
    target_dict = flax.serialization.to_state_dict(target)
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        stored = self._manager.item_metadata(step)['state']
        stored = stored.tree if hasattr(stored, 'tree') else stored
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      check_shapes(stored, target_dict, f'checkpoint {self.directory} step {step}')
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_without_absent_empty(target_dict, stored)),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      state = flax.serialization.from_state_dict(target, _refill(restored['state'], target_dict))
      return step, state, _decode_meta(restored['meta'])
    return None

  def _quarantine(self, step: int, error: Exception):
    path = os.path.join(self.directory, str(step))
    aside = os.path.join(self.directory, f'corrupt_{step}')
    logging.warning('Checkpoint %s is unreadable (%s: %s); moved to %s, falling back to the '
                    'previous one.', path, type(error).__name__, error, aside)
    os.replace(path, aside)
    self._manager.reload()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def load_variables(directory: str, step: Optional[int] = None, ema: bool = False) -> dict:
  """{'params', 'batch_stats', 'quant_state'} of checkpoint `step` (default: the newest).

  `directory` is a checkpoint directory or a training workdir containing `checkpoints/`.
  `ema`: the run's exponential moving average of the weights and BatchNorm statistics
  instead of the live ones (config.ema_decay > 0).
  """
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_handlers=_item_handlers(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'no orbax checkpoint {"" if step is None else step} found in '
                            f'{directory}')
  stored = manager.item_metadata(step)['state']
  stored = stored.tree if hasattr(stored, 'tree') else stored
  # Host arrays as the restore target: the devices (or processes) that saved the checkpoint
  # need not exist here.
  target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), stored)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))['state']
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


def _read_variables(path: str, step: Optional[int], model, ema: bool) -> dict:
  from bhvit_jax import convert  # pylint: disable=g-import-not-at-top  (convert imports us)
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  if os.path.isdir(path):
    return load_variables(path, step, ema)
  if ema:
    raise config_lib.UserError(f'{path}: EMA weights are read from a training run directory '
                               'only')
  if path.endswith('.msgpack'):
    return convert.load_flax_variables(path)
  if path.endswith(('.pth', '.pt', '.npz')):
    return convert.torch_to_flax(convert.load_torch_file(path), model)
  raise config_lib.UserError(f'{path}: a bit-packed file holds no latent weights; expected a '
                             f'run directory, WORKDIR:<step> or a {"/".join(FLOAT_FILES)} file')


def load_any(spec: str, model, reference: Optional[dict] = None, ema: bool = False) -> dict:
  """Float variables of `model` from any checkpoint the project reads.

  `spec`: a training run or checkpoints directory (newest step), `WORKDIR:<step>`,
  `WORKDIR:best` (the best evaluation's weights), a Flax `.msgpack`, or a PyTorch
  `.pth`/`.pt`/`.npz` state dict of the official BHViT; `ema`: the run's EMA weights. `reference`
  (variables or `jax.eval_shape` structs; default: the model's) fixes the collections and
  shapes; collections the checkpoint lacks keep the reference's. Raises ShapeMismatchError with
  the one mismatch listing.
  """
  if reference is None:
    from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    reference = jax.eval_shape(lambda rng: model_lib.init_variables(model, rng),
                               jax.random.PRNGKey(0))
  path, step = split_spec(spec)
  loaded = {k: v for k, v in _read_variables(path, step, model, ema).items()
            if k in reference and v}
  if 'params' not in loaded:
    raise config_lib.UserError(f'checkpoint {spec} contains no params')
  check_shapes(loaded, {k: reference[k] for k in loaded}, f'checkpoint {spec}')
  merged = dict(reference)
  merged.update({k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in loaded.items()})
  absent = [k for k, v in merged.items()
            if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(v))]
  if absent:
    raise config_lib.UserError(f'checkpoint {spec} lacks the variable collections {absent}')
  return merged
