"""Lossless conversion between the official PyTorch BHViT state dict and Flax variables.

The Flax tree mirrors the PyTorch module names, so a name maps by rule: `layerA_3` <->
`vit.encoder.layerA.3`; `kernel` <-> `weight` (transposed to NHWC/HWIO and `[in, out]`);
norm `scale` <-> `weight`; BatchNorm `mean`/`var` <-> `running_mean`/`running_var`; RPReLU
`prelu` <-> `prelu.weight`. A few broadcast parameters and the position embeddings change
shape; everything else is copied as is. Arrays are numpy on both sides (no torch needed).
"""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bhvit_jax import config_lib
from bhvit_jax import mismatch
from bhvit_jax import model as model_lib

# Flax collection of every PyTorch buffer name.
_BUFFERS = {'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var'),
            'num_batches_tracked': ('batch_stats', 'num_batches_tracked'),
            'init_state': ('quant_state', 'init_state')}
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'prelu': 'prelu.weight',
                  'mean': 'running_mean', 'var': 'running_var'}


def _prefix(first: str) -> str:
  if first.startswith(('layerA_', 'layerB_')):
    return 'vit.encoder.' + first.replace('_', '.')
  if first.startswith('patch_embed'):
    return 'vit.encoder.' + first
  return 'vit.' + first if first in ('embeddings', 'layernorm') else first


def torch_name(path) -> str:
  """Flax variable path (without the collection) -> PyTorch state-dict name."""
  leaf = _LEAF_TO_TORCH.get(path[-1], path[-1])
  return '.'.join((_prefix(path[0]),) + tuple(path[1:-1]) + (leaf,))


def _to_torch_layout(path, value):
  """Flax array -> the reference's layout for this name."""
  name = path[-1]
  if name == 'kernel':
    return value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
  if name == 'position_embeddings':
    if path[0] == 'embeddings':
      return value.transpose(0, 3, 1, 2)
    return value.reshape(1, -1, value.shape[-1])
  if name == 'a1':
    return value.reshape(1, 1, -1)
  if name == 'parm' or _is_spatial_move(path):
    return value.reshape(1, -1, 1, 1)
  return value


def _is_spatial_move(path):
  """`GC.move.bias` and `patch_embedK.move` are stored `[1, C, 1, 1]` by the reference."""
  return path[-2:] == ('move', 'bias') or (
      path[0].startswith('patch_embed') and path[1:] == ('move',))


def _from_torch_layout(path, value, target_shape):
  name = path[-1]
  if name == 'kernel':
    value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
  elif name == 'position_embeddings' and path[0] == 'embeddings':
    value = value.transpose(0, 2, 3, 1)
  return value.reshape(target_shape)


def _torch_shape(path, shape):
  return _to_torch_layout(path, np.zeros(shape, np.int8)).shape


def variable_shapes(model: model_lib.BHViT):
  """{collection: {path: ShapeDtypeStruct}} of `model` without allocating anything."""
  images = jnp.zeros((1, model.image_size, model.image_size, 3))
  variables = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, images))
  return {col: flax.traverse_util.flatten_dict(tree) for col, tree in variables.items()}


def unwrap_checkpoint(obj):
  """Accepts a state dict or the `{'model': state_dict}` wrapping of training scripts."""
  for key in ('model', 'state_dict', 'model_state'):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not obj:
    raise config_lib.UserError('not a PyTorch state dict: expected a mapping of tensor names '
                               f'to tensors, got {type(obj).__name__}')
  return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in obj.items()}


def torch_to_flax(state_dict, model: model_lib.BHViT, dtype=None):
  """PyTorch state dict (name -> array/tensor) -> Flax variables for `model`.

  Raises:
    mismatch.ShapeMismatchError listing every missing, unexpected and mis-shaped name.
  """
  state = {k: _numpy(v) for k, v in unwrap_checkpoint(state_dict).items()}
  shapes = variable_shapes(model)
  out, missing, wrong = {}, [], []
  for col, flat in shapes.items():
    for path, spec in flat.items():
      name = torch_name(path)
      if name not in state:
        missing.append(f'  {name}: missing in checkpoint')
        continue
      value = state.pop(name)
      want = _torch_shape(path, spec.shape)
      if tuple(value.shape) != tuple(want):
        wrong.append(f'  {name}: checkpoint {tuple(value.shape)} vs model {tuple(want)}')
        continue
      value = _from_torch_layout(path, value, spec.shape)
      cast = spec.dtype if dtype is None or not jnp.issubdtype(spec.dtype, jnp.floating) else dtype
      out.setdefault(col, {})[path] = np.asarray(value, dtype=cast)
  # Names the model lacks first: they tell a foreign state dict apart at a glance.
  mismatch.raise_mismatch('the PyTorch state dict', wrong + [
      f'  {name}: not in the model' for name in sorted(state)] + missing)
  return {col: flax.traverse_util.unflatten_dict(flat) for col, flat in out.items()}


def flax_to_torch(variables):
  """Flax variables -> PyTorch state dict of numpy arrays (load with `torch.from_numpy`)."""
  state = {}
  for col, tree in variables.items():
    if col not in ('params', 'batch_stats', 'quant_state'):
      continue
    for path, value in flax.traverse_util.flatten_dict(tree).items():
      value = np.asarray(value)
      if path[-1] == 'num_batches_tracked':
        value = value.astype(np.int64)
      state[torch_name(path)] = _to_torch_layout(path, value)
  return state


def _numpy(value):
  if hasattr(value, 'detach'):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def load_torch_file(path):
  """Loads a `.pth`/`.pt` file (needs the `torch` extra), or a `.npz` of the state dict's
  arrays by name (does not), into a dict of numpy arrays."""
  if str(path).endswith('.npz'):
    return _load_npz(path)
  try:
    import torch
  except ImportError as e:
    raise config_lib.UserError('reading PyTorch checkpoints needs the torch extra: '
                               'pip install -e ".[torch]"') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise FileNotFoundError(f'PyTorch checkpoint not found: {path}') from None
  except Exception as e:
    raise config_lib.UserError(f'not a readable PyTorch checkpoint: {_first_line(e)} ({path})'
                               ) from e
  return {k: _numpy(v) for k, v in unwrap_checkpoint(obj).items()}


def _first_line(error) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _load_npz(path):
  try:
    with np.load(path) as arrays:
      return dict(arrays)
  except FileNotFoundError:
    raise FileNotFoundError(f'state dict not found: {path}') from None
  except Exception as e:
    raise config_lib.UserError(f'{path} is not a readable .npz state dict: {_first_line(e)}'
                               ) from e


def save_torch_file(state, path):
  """Saves a state dict of numpy arrays as a PyTorch `.pth` file."""
  import torch
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


def save_flax_file(variables, path):
  """Writes Flax variables as one msgpack file (`flax.serialization`)."""
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))


def load_flax_variables(path):
  """Variables from a `.msgpack` file (`checkpoint.load_any` reads every format)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no Flax variables at {path}')
  with open(path, 'rb') as f:
    try:
      return flax.serialization.msgpack_restore(f.read())
    except Exception as e:
      raise config_lib.UserError(f'not a msgpack file of Flax variables: {_first_line(e)} '
                                 f'({path})') from e
