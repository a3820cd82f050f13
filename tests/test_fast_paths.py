"""The speed-oriented formulations give the plain model's numbers.

Each fast path (per-group convolutions, rematerialized blocks) is checked against an
independent formula or the plain path in float64, where both follow the same sign decisions,
so outputs, gradients and BatchNorm updates must agree to rounding.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import layers
from bhvit_jax import model as model_lib

SMALL = dict(hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
             mlp_sizes=(32, 64, 128, 256), num_classes=5, image_size=32, patch_size=2,
             window_size=1, weight_bits=1, input_bits=1, norm='batch', shift3=True,
             shift5=True, some_fp=True, gsb=False)


@pytest.fixture
def x64():
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', False)


def direct_grouped_conv(x, kernel, dilation, groups):
  """Zero-padded 'same' grouped dilated conv by explicit loops (NHWC, HWIO), float64."""
  b, h, w, c = x.shape
  k, _, cin, out = kernel.shape
  pad = dilation * (k // 2)
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  y = np.zeros((b, h, w, out))
  per_group = out // groups
  for o in range(out):
    g = o // per_group
    for i in range(k):
      for j in range(k):
        patch = xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w,
                   g * cin:(g + 1) * cin]
        y[..., o] += patch @ kernel[i, j, :, o]
  return y


@pytest.mark.parametrize('dilation', [1, 3])
def test_split_group_conv_matches_direct_convolution(x64, dilation):
  rng = np.random.RandomState(0)
  x = rng.randn(2, 7, 7, 8)
  kernel = rng.randn(3, 3, 2, 8)
  expected = direct_grouped_conv(x, kernel, dilation, groups=4)
  for split in (False, True):
    conv = layers.BinaryConv(8, 3, dilation=dilation, groups=4, padding=dilation,
                             weight_bits=32, input_bits=32, use_bias=False, split_groups=split)
    y = conv.apply({'params': {'kernel': jnp.asarray(kernel)}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-12)


def test_split_group_conv_gradients_match_grouped(x64):
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 9, 9, 8))
  kernel = jnp.asarray(rng.randn(3, 3, 2, 8))
  cotangent = jnp.asarray(rng.randn(2, 9, 9, 8))

  def grads(split):
    conv = layers.BinaryConv(8, 3, dilation=3, groups=4, padding=3, use_bias=False,
                             split_groups=split)
    loss = lambda k, a: jnp.sum(conv.apply({'params': {'kernel': k}}, a) * cotangent)
    return jax.grad(loss, argnums=(0, 1))(kernel, x)

  for plain, fast in zip(grads(False), grads(True)):
    np.testing.assert_allclose(np.asarray(fast), np.asarray(plain), rtol=1e-12, atol=1e-12)


def _train_outputs(model, variables, images, labels):
  """Logits, BatchNorm updates and parameter gradients of one train-mode CE step."""

  def loss_fn(params):
    logits, updates = model.apply({**variables, 'params': params}, images, train=True,
                                  mutable=['batch_stats'])
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))
    return ce, (logits, updates['batch_stats'])

  (_, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
  eval_logits = model.apply(variables, images, train=False)
  return {'logits': logits, 'eval_logits': eval_logits, 'batch_stats': stats, 'grads': grads}


@pytest.mark.parametrize('fast', [dict(split_groups=True), dict(remat=True),
                                  dict(split_groups=True, remat=True)],
                         ids=['split_groups', 'remat', 'both'])
def test_fast_model_matches_plain_model(x64, fast):
  rng = np.random.RandomState(2)
  images = jnp.asarray(rng.randn(4, 32, 32, 3))
  labels = jnp.asarray(rng.randint(0, 5, 4))
  plain = model_lib.BHViT(**SMALL)
  variables = plain.init({'params': jax.random.PRNGKey(0)}, images, train=False)
  variables, _ = model_lib.calibrate(plain, variables, images)
  expected = _train_outputs(plain, variables, images, labels)
  got = _train_outputs(model_lib.BHViT(**SMALL, **fast), variables, images, labels)
  flat_expected = flax.traverse_util.flatten_dict(expected, sep='/')
  flat_got = flax.traverse_util.flatten_dict(got, sep='/')
  assert flat_got.keys() == flat_expected.keys()
  for name, want in flat_expected.items():
    np.testing.assert_allclose(np.asarray(flat_got[name]), np.asarray(want), rtol=1e-10,
                               atol=1e-12, err_msg=name)
  # The check is not vacuous: the gradients of binarized kernels are nonzero.
  assert float(jnp.abs(expected['grads']['layerA_0']['GC']['cov2']['kernel']).sum()) > 0


def test_bfloat16_compute_runs_on_cpu():
  rng = np.random.RandomState(3)
  images = jnp.asarray(rng.randn(2, 32, 32, 3), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 5, 2))
  f32 = model_lib.BHViT(**SMALL, split_groups=True)
  variables = f32.init({'params': jax.random.PRNGKey(0)}, images, train=False)
  bf16 = model_lib.BHViT(**SMALL, split_groups=True, dtype=jnp.bfloat16)
  out = _train_outputs(bf16, variables, images, labels)
  assert out['logits'].dtype == jnp.bfloat16
  leaves = jax.tree_util.tree_leaves(out['grads'])
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # params stay float32
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)
  reference = f32.apply(variables, images, train=False)
  # bfloat16 keeps ~3 significant digits; the logits must still track the float32 ones.
  corr = np.corrcoef(np.asarray(out['eval_logits'], np.float32).ravel(),
                     np.asarray(reference).ravel())[0, 1]
  assert corr > 0.9
