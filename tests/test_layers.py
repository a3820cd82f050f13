"""Layers: PyTorch BatchNorm semantics, shifts, and gradients (finite differences / STE)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import layers


def _fd_grad(f, x, eps=1e-3):
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[idx] = eps
    out[idx] = (f(x + d) - f(x - d)) / (2 * eps)
  return out


def test_batchnorm_train_uses_biased_variance_and_updates_with_unbiased():
  x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
  norm = layers.TokenNorm('batch')
  variables = norm.init(jax.random.PRNGKey(0), x, train=True)
  y, upd = norm.apply(variables, x, train=True, mutable=['batch_stats'])
  mean, var_b = np.array([3.0, 30.0]), np.array([3.5, 350.0])  # biased: Σ(x-m)²/4
  np.testing.assert_allclose(y, (np.asarray(x) - mean) / np.sqrt(var_b + 1e-5), rtol=1e-6)
  stats = upd['batch_stats']
  np.testing.assert_allclose(stats['mean'], 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * var_b * 4 / 3, rtol=1e-6)
  assert int(stats['num_batches_tracked']) == 1
  y_eval = norm.apply({**variables, 'batch_stats': stats}, x, train=False)
  np.testing.assert_allclose(
      y_eval, (np.asarray(x) - stats['mean']) / np.sqrt(stats['var'] + 1e-5), rtol=1e-6)


def test_layernorm_matches_two_pass_formula():
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 8)) * 3 + 100
  norm = layers.TokenNorm('layer')
  y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
  xn = np.asarray(x, np.float64)
  ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def _reference_shift_paths(x, scales):
  """The reference's shift paths term by term, written with explicit circular indices."""
  c = x.shape[-1]
  rolled = lambda axis, s: jnp.take(x, jnp.array([(i - s) % x.shape[axis]
                                                  for i in range(x.shape[axis])]), axis=axis)
  total = 0
  for (kind, reach), (alpha, move) in scales.items():
    if kind == 'ch':
      g = c // 4
      path = jnp.concatenate([rolled(1, reach)[..., :g], rolled(1, -reach)[..., g:2 * g],
                              rolled(2, reach)[..., 2 * g:3 * g], rolled(2, -reach)[..., 3 * g:]],
                             axis=-1)
    else:
      axis = {'h': 1, 'w': 2}[kind]
      path = sum(rolled(axis, s) for s in range(-reach, reach + 1)) / (2 * reach + 1)
    total = total + path * alpha + move
  return total


def test_shift_roll_convention_and_channel_groups():
  x = np.arange(2 * 5 * 6 * 8, dtype=np.float64).reshape(2, 5, 6, 8)
  one, zero = np.ones(8), np.zeros(8)
  mixed = np.asarray(layers.shift_residuals(jnp.asarray(x, jnp.float32), {('ch', 2): (one, zero)}))
  np.testing.assert_array_equal(mixed[:, 3, :, 0:2], x[:, 1, :, 0:2])   # group 0: +2 along H
  np.testing.assert_array_equal(mixed[:, 3, :, 2:4], x[:, 0, :, 2:4])   # group 1: -2 along H
  np.testing.assert_array_equal(mixed[:, :, 3, 4:6], x[:, :, 1, 4:6])   # group 2: +2 along W
  np.testing.assert_array_equal(mixed[:, :, 3, 6:8], x[:, :, 5, 6:8])   # group 3: -2 along W
  h3 = np.asarray(layers.shift_residuals(jnp.asarray(x, jnp.float32), {('h', 1): (one, zero)}))
  np.testing.assert_allclose(h3[:, 2], (x[:, 1] + x[:, 2] + x[:, 3]) / 3, rtol=1e-6)


@pytest.mark.parametrize('kinds', [(('h', 1), ('w', 1), ('ch', 1)),
                                   (('h', 1), ('w', 1), ('ch', 1), ('h', 2), ('w', 2), ('ch', 2)),
                                   (('w', 2), ('ch', 2))])
def test_folded_shift_stencil_equals_paths_summed(x64, kinds):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 7, 6, 12))
  scales = {k: (jnp.asarray(rng.randn(12)), jnp.asarray(rng.randn(12))) for k in kinds}
  cotangent = jnp.asarray(rng.randn(2, 7, 6, 12))
  results = []
  for f in (_reference_shift_paths, layers.shift_residuals,
            lambda x, scales: layers.shift_residuals(x, scales, fast=True)):
    out, vjp = jax.vjp(f, x, scales)
    results.append((out, vjp(cotangent)))
  # Outputs, the input's gradient (the fast path's custom mirrored stencil) and every
  # alpha/move gradient, of the plain paths and of the folded stencil.
  for got in results[1:]:
    chex.assert_trees_all_close(got, results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('module,shape', [
    (layers.RPReLU(), (3, 4)),
    (layers.LayerScale(0.1), (3, 4)),
    (layers.BinaryDense(5, weight_bits=32, input_bits=32), (3, 4)),
    (layers.BinaryConv(8, 3, dilation=3, groups=4, padding=3, weight_bits=32, input_bits=32),
     (1, 5, 5, 8)),
])
def test_smooth_layers_gradient_matches_finite_differences(module, shape):
  jax.config.update('jax_enable_x64', True)
  try:
    x = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float64)
    variables = module.init(jax.random.PRNGKey(3), x)
    variables = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.PRNGKey(4),
                                                                     v.shape, v.dtype), variables)
    w = jax.random.normal(jax.random.PRNGKey(5), module.apply(variables, x).shape, jnp.float64)
    f = lambda v: float(jnp.sum(module.apply(variables, jnp.asarray(v)) * w))
    g = jax.grad(lambda v: jnp.sum(module.apply(variables, v) * w))(x)
    np.testing.assert_allclose(g, _fd_grad(f, x, 1e-6), rtol=1e-6, atol=1e-8)
  finally:
    jax.config.update('jax_enable_x64', False)


def test_binary_dense_input_gradient_follows_ste():
  x = jnp.array([[-1.5, -0.5, 0.0, 0.4, 2.0]])
  dense = layers.BinaryDense(3)
  variables = dense.init(jax.random.PRNGKey(0), x)
  up = jnp.array([[1.0, -2.0, 0.5]])
  g = jax.grad(lambda v: jnp.sum(dense.apply(variables, v) * up))(x)
  from bhvit_jax import quantizers
  w_hat = quantizers.binarize_weight(variables['params']['kernel'])
  slope = np.array([0, 2 + 2 * -0.5, 2, 2 - 2 * 0.4, 0])
  np.testing.assert_allclose(g, (up @ w_hat.T) * slope, rtol=1e-6)


def test_split_group_conv_equals_grouped_conv():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 16))
  kwargs = dict(features=16, kernel_size=3, dilation=5, groups=4, padding=5)
  grouped, split = layers.BinaryConv(**kwargs), layers.BinaryConv(**kwargs, split_groups=True)
  variables = grouped.init(jax.random.PRNGKey(1), x)
  loss = lambda m: lambda v, xx: jnp.sum(m.apply(v, xx) ** 2)
  np.testing.assert_allclose(split.apply(variables, x), grouped.apply(variables, x), rtol=1e-5,
                             atol=1e-5)
  ga = jax.grad(loss(grouped), argnums=(0, 1))(variables, x)
  gb = jax.grad(loss(split), argnums=(0, 1))(variables, x)
  chex.assert_trees_all_close(ga, gb, rtol=1e-4, atol=1e-4)


def test_torch_default_init_bounds():
  dense = layers.BinaryDense(64, use_bias=True)
  params = dense.init(jax.random.PRNGKey(0), jnp.ones((1, 100)))['params']
  for leaf in (params['kernel'], params['bias']):
    assert float(jnp.max(jnp.abs(leaf))) <= 0.1 and float(jnp.std(leaf)) > 0.04
