"""Bit-packed export and XNOR-popcount inference (bhvit_jax.packed)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import layers
from bhvit_jax import packed
from bhvit_jax import reference


def _ternary(key, shape, zero_fraction=0.2):
  """Random values with a share of exact zeros, as activations/weights can have."""
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, shape)
  return jnp.where(jax.random.uniform(k2, shape) < zero_fraction, 0.0, x)


def test_pack_bits_layout():
  bits = np.zeros(40, bool)
  bits[[0, 5, 31, 32, 39]] = True
  words = np.asarray(packed.pack_bits(jnp.asarray(bits)))
  assert words.dtype == np.uint32
  np.testing.assert_array_equal(words, [1 | 1 << 5 | 1 << 31, 1 | 1 << 7])
  np.testing.assert_array_equal(np.asarray(packed.unpack_bits(jnp.asarray(words), 40)), bits)


@pytest.mark.parametrize('weight_zeros', [0.0, 0.2])
def test_xnor_popcount_dense_equals_float_sign_matmul(weight_zeros):
  ka, kw = jax.random.split(jax.random.PRNGKey(0))
  fan_in = 77  # not a multiple of 32: the last word's tail bits must contribute nothing
  a = _ternary(ka, (5, 3, fan_in))
  w = _ternary(kw, (fan_in, 11), weight_zeros)
  expected = np.asarray(jnp.sign(a)) @ np.asarray(jnp.sign(w))

  @jax.jit
  def xnor(a, w):
    w_nonzero = packed.pack_bits(w.T != 0)[None] if weight_zeros else None
    return packed.xnor_popcount_dot(packed.pack_bits(a > 0)[..., None, :],
                                    packed.pack_bits(a != 0)[..., None, :],
                                    packed.pack_bits(w.T > 0)[None], w_nonzero)[..., 0, :]

  got = xnor(a, w)
  assert (np.asarray(jnp.sign(a)) == 0).any()
  np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize('products', packed.PRODUCTS)
@pytest.mark.parametrize('kernel_size, stride, dilation, groups, channels',
                         [(3, 1, 3, 4, 8), (2, 2, 1, 1, 8), (3, 2, 1, 2, 80)])
def test_packed_conv_equals_float_binary_conv(kernel_size, stride, dilation, groups, channels,
                                              products):
  """Zero padding and exact zeros in the input must contribute sign(0) = 0, as in the float conv.

  Channels per group 2, 8 and 40: each tap's channels take one word, or a word and a partial
  one, so the file's contiguous fan-in bits are regrouped per tap. 'float' products unpack
  the same words into the kernel of a grouped convolution (the ONNX export).
  """
  conv = layers.BinaryConv(16, kernel_size, stride=stride, dilation=dilation, groups=groups,
                           padding=dilation if kernel_size == 3 else 0)
  x = _ternary(jax.random.PRNGKey(1), (2, 10, 10, channels))
  variables = conv.init(jax.random.PRNGKey(2), x)
  expected = jax.jit(conv.apply)(variables, x)
  kernel = variables['params']['kernel']
  sign, nonzero, scale = packed._pack_kernel(kernel, recu=False)
  assert nonzero is None
  entry = {'sign': sign, 'scale': scale.astype(np.float32),
           'shift': np.asarray(variables['params']['bias'])}
  got = jax.jit(lambda v, e, x: conv.apply(
      v, x, method=lambda m, y: packed._binary_layer(m, y, e, products)))(variables, entry, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def fixture(case_public):
  return reference.Fixture(str(case_public), x64=False)


def test_packed_fixture_model_size_and_logits(fixture, tmp_path):
  tree = packed.export(fixture.model, fixture.variables)
  path = tmp_path / 'case_public.bhvitpk'
  size = packed.save(tree, path)
  assert size == os.path.getsize(path)
  assert size <= 1.1 * packed.theoretical_bytes(fixture.model)
  assert size < packed.float_checkpoint_bytes(fixture.variables) / 5
  model, arrays = packed.load(path)
  assert model == fixture.model
  # Every binarized layer is stored as uint32 words, every BatchNorm folded.
  assert all(e['sign'].dtype == np.uint32 for e in arrays['binary'].values())
  assert 'batch_stats' not in arrays['variables']
  got = jax.jit(lambda a, x: packed.apply(model, a, x))(arrays, fixture.images)
  want = jax.jit(lambda v, x: fixture.model.apply(v, x, train=False))(fixture.variables,
                                                                      fixture.images)
  assert reference.rel_error(got, want) <= 1e-5


@pytest.mark.parametrize('content', [b'\x80', b'\xc1garbage', b''])
def test_load_rejects_other_files(tmp_path, content):
  path = tmp_path / 'x.bin'
  path.write_bytes(content)
  with pytest.raises(ValueError, match='not a packed BHViT file'):
    packed.load(path)
