"""bhvit_jax.onnx_export on small JAX functions: onnxruntime's results against JAX's, at
batch sizes other than the traced ones (the symbolic batch) and with a fixed batch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest

from bhvit_jax import config_lib
from bhvit_jax import fastpath
from bhvit_jax import onnx_export
from bhvit_jax import packed

RNG = np.random.default_rng(0)
WEIGHT = RNG.normal(size=(3, 3, 2, 6)).astype(np.float32)  # HWIO, 2 groups of 2 -> 3
WORDS = RNG.integers(0, 2 ** 32, (5, 2), dtype=np.uint32)  # 5 rows of 40 bits


def _conv(x, w):
  """Strided, dilated, asymmetrically padded grouped NHWC convolution."""
  return jax.lax.conv_general_dilated(
      x, w, (2, 1), [(1, 2), (2, 2)], rhs_dilation=(2, 2), feature_group_count=2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')


def _pools(x):
  """Window sum (avg_pool), max and min with strides and padding."""
  low = jax.lax.reduce_window(x, np.inf, jax.lax.min, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  high = jax.lax.reduce_window(x, -np.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))
  return nn.avg_pool(x, (2, 2), strides=(2, 2)) + high - low


def _batched_dot(x, w):
  """[B, 3, 5, 4] x [3, 4, 7] -> [3, B, 5, 7]: a batch dim that is not the leading one."""
  return jax.lax.dot_general(x, w, (((3,), (1,)), ((1,), (0,))), precision='highest')


def _attention(x):
  """softmax(x·xᵀ)·x over leading batch dims: MatMuls, one with a transposed operand."""
  scores = jnp.einsum('nhqd,nhkd->nhqk', x, x, precision='highest')
  return jnp.einsum('nhqk,nhkd->nhqd', jax.nn.softmax(scores), x, precision='highest')


def _reshapes(x):
  """Reshapes, broadcasts, splits and slices over the batch, an iota beside it."""
  y = x.reshape(x.shape[0] * 2, -1) * 2
  total = jnp.broadcast_to(y.sum(0), (x.shape[0], y.shape[1]))
  left, right = jnp.split(x[:, 0], [1], axis=1)
  return (total + jnp.arange(y.shape[1]) + y.reshape(x.shape[0], 2, -1)[:, 0] + x[:, 0, 1:2] +
          jnp.tile(jnp.concatenate([right, left], 1), (1, 3)))


def _unpacked_signs(x, words):
  """x `[B, 40]` times the ±1 signs of packed bits, unpacked in the graph."""
  signs = jnp.where(packed.unpack_bits(words, 40), 1, -1)
  return jnp.matmul(x, signs.T.astype(x.dtype), precision='highest')


def _indexing(x):
  """take_along_axis at the argmax, x[0], a runtime-only conditional, erfc, rem, rounding."""
  first = jnp.argmax(x, -1)[..., None]
  peak = jnp.take_along_axis(x, first, -1)[..., 0]
  peak = fastpath.opaque(peak, x) if jax.default_backend() == 'cpu' else peak
  gelu = jax.nn.gelu(peak, approximate=False) + jnp.round(peak * 3) + x[0, 0, 0]
  return gelu + jax.lax.rsqrt(peak * peak + 1) + (jnp.arange(3) % 2 == 0)


CASES = {'conv': (_conv, (None, 9, 8, 4), [WEIGHT]),
         'pools': (_pools, (None, 4, 4, 3), []),
         'dot_general': (_batched_dot, (None, 3, 5, 4), [RNG.normal(size=(3, 4, 7))
                                                         .astype(np.float32)]),
         'attention': (_attention, (None, 2, 5, 4), []),
         'reshapes': (_reshapes, (None, 6, 4), []),
         'unpack_bits': (_unpacked_signs, (None, 40), [WORDS]),
         'indexing': (_indexing, (None, 3, 5), [])}


def _run(fn, shape, constants, batch, sizes):
  model = onnx_export.to_onnx(fn, [(shape, np.float32)], constants, input_names=['x'],
                              output_names=['y'], batch=batch)
  onnx.checker.check_model(model, full_check=True)
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  for size in sizes:
    x = RNG.normal(size=[size if d is None else d for d in shape]).astype(np.float32)
    want = np.asarray(jax.jit(fn)(x, *constants))
    got = session.run(None, {'x': x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  return model


@pytest.mark.parametrize('case', CASES)
def test_symbolic_batch_matches_jax(case):
  fn, shape, constants = CASES[case]
  model = _run(fn, shape, constants, None, (1, 4))
  assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch'
  # The constants are stored as given: unpacking happens in the graph.
  stored = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
  for i, c in enumerate(constants):
    np.testing.assert_array_equal(stored[f'constant_{i}'], c)


def test_fixed_batch():
  model = _run(_reshapes, (None, 6, 4), [], 3, (3,))
  assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3


def test_unsupported_primitive_names_it():
  with pytest.raises(config_lib.UserError, match='primitive population_count$'):
    onnx_export.to_onnx(jax.lax.population_count, [((None, 2), np.uint32)],
                        input_names=['x'], output_names=['y'])
