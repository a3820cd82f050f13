"""Fine-tuning loads: a new classifier, resized position embeddings, other mismatches listed."""
import flax
import jax
import numpy as np
import pytest

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import convert
from bhvit_jax import finetune
from bhvit_jax import model as model_lib

TINY = dict(hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
            mlp_sizes=(16, 32, 64, 128), patch_size=4, window_size=1, split_groups=True)


def _model(**overrides):
  return model_lib.from_config({**TINY, 'num_classes': 10, 'image_size': 32, **overrides})


def _flat(variables, collection='params'):
  return flax.traverse_util.flatten_dict(variables[collection])


def _variables(model, seed):
  """Random variables of `model`'s shapes (distinct values everywhere, nothing compiled)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: model_lib.init_variables(model, k), jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A 10-class, 32² run's variables, saved as .msgpack."""
  variables = _variables(_model(), 1)
  path = tmp_path_factory.mktemp('source') / 'run.msgpack'
  convert.save_flax_file(variables, path)
  return variables, str(path)


def test_new_head_is_initialized_and_the_rest_loaded(source, caplog):
  variables, path = source
  target = _model(num_classes=5)
  reference = _variables(target, 2)
  with caplog.at_level('WARNING'):
    loaded = ckpt_lib.load_any(path, target, reference, adapt=True)
  assert '10 -> 5 classes' in caplog.text
  got, src, ref = _flat(loaded), _flat(variables), _flat(reference)
  assert set(got) == set(src)
  for path_, value in got.items():
    want = ref[path_] if path_[0] == 'classifier' else src[path_]
    np.testing.assert_array_equal(value, want, err_msg=str(path_))
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded['batch_stats'],
                         variables['batch_stats'])
  with pytest.raises(ckpt_lib.ShapeMismatchError, match='classifier'):
    ckpt_lib.load_any(path, target, reference)  # without adapt, as before


def test_position_embeddings_resized_bicubically(source, tmp_path):
  torch = pytest.importorskip('torch')
  variables, _ = source
  # From a PyTorch state dict: its class count and resolution are read from the file.
  npz = tmp_path / 'run.npz'
  np.savez(npz, **convert.flax_to_torch(variables))
  target = _model(num_classes=5, image_size=64)
  reference = _variables(target, 2)
  loaded = ckpt_lib.load_any(str(npz), target, reference, adapt=True)
  got, src = _flat(loaded), _flat(variables)
  resized = [p for p in src if p[-1] == 'position_embeddings']
  assert len(resized) == 4
  for path_, value in got.items():
    if path_ in resized:
      nchw = torch.from_numpy(np.array(src[path_]).transpose(0, 3, 1, 2))
      want = torch.nn.functional.interpolate(nchw, size=value.shape[1:3], mode='bicubic',
                                             align_corners=False, antialias=True)
      np.testing.assert_allclose(value, want.numpy().transpose(0, 2, 3, 1), atol=1e-6,
                                 err_msg=str(path_))
      assert value.shape[1:3] == (2 * src[path_].shape[1],) * 2
    elif path_[0] != 'classifier':
      np.testing.assert_array_equal(value, src[path_], err_msg=str(path_))


def test_resize_is_identity_at_the_same_grid(source):
  pos = _flat(source[0])[('patch_embed1', 'position_embeddings')]
  np.testing.assert_array_equal(finetune.resize_position_embedding(pos, pos.shape[1:3]), pos)


def test_other_mismatches_are_listed(source):
  _, path = source
  target = _model(mlp_sizes=(16, 32, 64, 256), num_classes=5)
  with pytest.raises(ckpt_lib.ShapeMismatchError) as raised:
    ckpt_lib.load_any(path, target, _variables(target, 2), adapt=True)
  message = str(raised.value)
  assert '(10 mismatches)' in message and 'classifier' not in message
  assert 'params/layerB_1/output/dense/kernel: checkpoint (128, 64) vs model (256, 64)' in message
  with pytest.raises(ValueError, match='must be divisible by window_size=7'):
    _model(image_size=96, window_size=7)  # grids 6/3: another resolution needs another window
