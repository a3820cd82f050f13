"""tools/plot_attention.py writes a readable, non-blank PNG of the binarized attention."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bhvit_jax import model as model_lib
import programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = dict(hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
              mlp_sizes=(16, 32, 64, 128), num_classes=10, image_size=48, patch_size=2,
              window_size=3)


@pytest.mark.parametrize('gsb', [True, False])
def test_writes_non_blank_png(tmp_path, gsb):
  tool = programs.load_tool('plot_attention')
  model = model_lib.BHViT(**FIELDS, gsb=gsb)
  image = tool.load_image('mnist:3', model.image_size)
  assert image.shape == (48, 48, 3) and image.dtype == np.float32
  # threefry keys compile slowly for a whole model's init; rbg is enough for a test.
  key = jax.random.key(0, impl='unsafe_rbg')
  variables = jax.jit(model.init)({'params': key}, jnp.asarray(image)[None])
  out = tmp_path / 'attention.png'
  size = tool.plot(model, variables, image, blocks=['layerB_0'], heads=[0, 1], window=3,
                   query=4, out=str(out))
  with Image.open(out) as png:
    assert png.format == 'PNG' and png.size == size
    pixels = np.asarray(png.convert('L'), np.float32)
  assert size[0] >= 600 and size[1] >= 200  # seven panels side by side, two rows
  assert pixels.std() > 20 and len(np.unique(pixels)) > 50


def test_key_layout_places_window_and_global_tokens():
  tool = programs.load_tool('plot_attention')
  row = np.arange(9 + 4, dtype=float)
  grid = tool.key_layout(row, 3)
  np.testing.assert_array_equal(grid[:3, :3], np.arange(9).reshape(3, 3))
  np.testing.assert_array_equal(grid[:2, 4:], [[9, 10], [11, 12]])
  assert np.isnan(grid[:, 3]).all() and np.isnan(grid[2, 4:]).all()


def test_bad_selection_is_named():
  tool = programs.load_tool('plot_attention')
  model = model_lib.BHViT(**FIELDS, gsb=True)
  image = np.zeros((48, 48, 3), np.float32)
  variables = jax.eval_shape(model.init, {'params': jax.random.PRNGKey(0)},
                             jnp.asarray(image)[None])
  with pytest.raises(ValueError, match='no attention block named'):
    tool.plot(model, variables, image, blocks=['layerA_0'])
