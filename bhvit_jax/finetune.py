"""Fine-tuning: adapts pretrained variables to a model with another head or resolution.

`adapt_variables` takes the loaded variables and the target model's freshly initialized ones
and returns the loaded ones with
  * the classifier re-initialized when the number of classes differs (logged in one line);
  * every learned position embedding (the stem's and each downsampling's, `[1, h, w, C]`)
    resized bicubically to the target grid, as timm resizes a ViT's (`resample_abs_pos_embed`:
    bicubic with antialiasing, half-pixel centres).
Any other difference is left in place, so the caller's shape check lists it. The target
model's own validation (`model.validate`) has already checked that its stage-3/4 grids are
multiples of the window at the new image size (224 -> 288 needs window_size 9 or 3, not 7).
"""
import logging

import flax
import jax
import jax.numpy as jnp

from bhvit_jax import convert

CLASSIFIER = 'classifier'
POSITION_EMBEDDINGS = 'position_embeddings'


def resize_position_embedding(pos, grid):
  """`[1, h, w, C]` -> `[1, grid[0], grid[1], C]`, bicubic (a = -0.5) with antialiasing.

  The same function as PyTorch's `interpolate(mode='bicubic', antialias=True)`, which timm
  uses for ViT position embeddings; the identity when the grid is unchanged.
  """
  if tuple(pos.shape[1:3]) == tuple(grid):
    return pos
  dtype = pos.dtype
  resized = jax.image.resize(jnp.asarray(pos, jnp.float32), (pos.shape[0], *grid, pos.shape[3]),
                             method='bicubic', antialias=True)
  return resized.astype(dtype)


def _resizable(stored, target) -> bool:
  return len(stored) == len(target) == 4 and stored[0] == target[0] and stored[3] == target[3]


def adapt_variables(loaded: dict, reference: dict) -> dict:
  """`loaded` with a new classifier and resized position embeddings where `reference` differs.

  Args:
    loaded: variables read from a pretrained run ({'params', 'batch_stats'?, ...}).
    reference: the target model's initialized variables (concrete arrays): the source of the
      new classifier and of the target shapes.
  Returns:
    The adapted variables; leaves that differ in any other way are returned unchanged.
  """
  params = flax.traverse_util.flatten_dict(loaded.get('params', {}))
  target = flax.traverse_util.flatten_dict(reference.get('params', {}))
  head = [p for p in params if p[0] == CLASSIFIER and p in target]
  shapes = [(params[p].shape, target[p].shape) for p in head]
  # Only the class axis may differ: another backbone width is a mismatch, not a new task.
  if any(a != b for a, b in shapes) and all(a[:-1] == b[:-1] for a, b in shapes):
    logging.warning('init_from: the classifier is re-initialized (%d -> %d classes)',
                    shapes[0][0][-1], shapes[0][1][-1])
    params.update({p: target[p] for p in head})
  for path, value in params.items():
    want = target.get(path)
    if (path[-1] == POSITION_EMBEDDINGS and want is not None and value.shape != want.shape
        and _resizable(value.shape, want.shape)):
      params[path] = resize_position_embedding(value, want.shape[1:3])
  adapted = dict(loaded)
  adapted['params'] = flax.traverse_util.unflatten_dict(params)
  return adapted


def source_model(state_dict, model):
  """`model` with the class count and image size of a PyTorch state dict, so it converts
  without a shape error and `adapt_variables` can then fit it to `model`."""
  state = convert.unwrap_checkpoint(state_dict)
  classifier = state.get(convert.torch_name((CLASSIFIER, 'kernel')))
  stem = state.get(convert.torch_name(('embeddings', POSITION_EMBEDDINGS)))  # [1, C, h, w]
  if classifier is None or stem is None or len(stem.shape) != 4:
    return model  # the conversion lists what is missing
  # Window 1 fits any grid, and the window size shapes no parameter.
  return model.clone(num_classes=int(classifier.shape[0]),
                     image_size=int(stem.shape[2]) * model.patch_size, window_size=1)
