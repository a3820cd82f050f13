"""Each quantizer against values worked out by hand from docs/reference.md §2."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import quantizers as q


def test_sign_ste_forward_and_approx_sign_gradient():
  x = jnp.array([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5])
  np.testing.assert_array_equal(q.sign_ste(x), [-1, -1, -1, 0, 1, 1, 1])
  grad = jax.grad(lambda v: jnp.sum(q.sign_ste(v) * jnp.arange(1.0, 8.0)))(x)
  # slope 2+2x on [-1, 0], 2-2x on (0, 1], 0 elsewhere; times the upstream 1..7.
  np.testing.assert_allclose(grad, [0, 0 * 2, 1 * 3, 2 * 4, 1.5 * 5, 0 * 6, 0], atol=1e-7)


def test_binarize_weight_scale_centring_and_inclusive_ste():
  # Dense kernel [in=3, out=2]; column 0 centred is [-0.5, 1.5, -1.0] (|-1.0| <= 1 passes),
  # column 1 is constant so its centred weights are exactly 0 (sign 0).
  w = jnp.array([[0.5, 1.0], [2.5, 1.0], [0.0, 1.0]])
  np.testing.assert_allclose(q.binarize_weight(w), [[-1.0, 0], [1.0, 0], [-1.0, 0]])
  g = jnp.array([[1.0, 1.0], [2.0, 5.0], [3.0, 6.0]])
  dw = jax.grad(lambda v: jnp.sum(q.binarize_weight(v) * g))(w)
  # column 0: g*mask = [1, 0, 3], minus its mean 4/3; column 1: g - mean(g) (mask all 1).
  np.testing.assert_allclose(dw[:, 0], [-1 / 3, -4 / 3, 5 / 3], rtol=1e-6)
  np.testing.assert_allclose(dw[:, 1], [-3, 1, 2], rtol=1e-6)


def test_binarize_weight_gradient_is_not_scaled():
  w = jnp.array([[0.1], [0.3]]) * 10  # mean |W| = 2: a scaled STE would double the gradient
  dw = jax.grad(lambda v: jnp.sum(q.binarize_weight(v) * jnp.array([[1.0], [0.0]])))(w)
  np.testing.assert_allclose(dw[:, 0], [0.5, -0.5])


def test_binarize_weight_conv_layout_per_output_channel():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 5))
  out = q.binarize_weight(w)
  for o in range(5):
    wo = np.asarray(w[..., o])
    np.testing.assert_allclose(out[..., o], np.mean(np.abs(wo)) * np.sign(wo - wo.mean()),
                               rtol=1e-6)


def _recu_reference(w):
  """ReCU per docs/reference.md §2: normalized weights and tau (numpy, columns are output channels)."""
  c = w - w.mean(0, keepdims=True)
  std = np.sqrt(c.var(0, ddof=1, keepdims=True) + 1e-5)
  wn = c / (std / (2 * math.sqrt(2)))
  return wn, -np.mean(np.abs(wn)) * math.log(2 - 2 * 0.92)


def test_recu_forward_mask_and_gradient_through_normalization():
  w = np.random.default_rng(0).normal(size=(16, 3))
  wn, tau = _recu_reference(w)
  out = jax.jit(lambda v: q.binarize_weight(v, recu=True))(jnp.asarray(w))
  np.testing.assert_allclose(out, np.abs(w).mean(0) * np.sign(wn), rtol=1e-6)
  g = np.random.default_rng(1).normal(size=w.shape)
  dw = jax.grad(lambda v: jnp.sum(q.binarize_weight(v, recu=True) * g))(jnp.asarray(w))

  def surrogate(v):  # docs/reference.md §2: the gradient is that of clip(Wn(W), -tau, tau), tau constant
    return np.sum(g * np.clip(_recu_reference(v)[0], -tau, tau))

  eps, fd = 1e-6, np.zeros_like(w)
  for idx in np.ndindex(w.shape):
    d = np.zeros_like(w)
    d[idx] = eps
    fd[idx] = (surrogate(w + d) - surrogate(w - d)) / (2 * eps)
  np.testing.assert_allclose(dw, fd, rtol=1e-3, atol=1e-5)
  assert np.any(np.abs(wn) > tau), 'test data should exercise the clipped region'


def test_gsb_row_where_round_is_zero_but_above_threshold():
  p = jnp.array([[0.2, 0.15, 0.1, 0.05]])
  alpha, alpha2, alpha3 = jnp.array(0.5), jnp.array(2.0), jnp.array(3.0)
  # q = [.4, .3, .2, .1]: round -> 0 everywhere; T2 = [1,0,0,0], T1 = [0,1,0,0],
  # T0 = 0 - [1,1,0,0] = [-1,-1,0,0] (kept negative, docs/reference.md §2).
  out = q.gsb_quantize(p, alpha, alpha2, alpha3)
  np.testing.assert_allclose(out, [[(-1 + 3) * 0.5, (-1 + 2) * 0.5, 0, 0]])
  grads = jax.grad(lambda *a: jnp.sum(q.gsb_quantize(*a)), argnums=(0, 1, 2, 3))(
      p, alpha, alpha2, alpha3)
  np.testing.assert_allclose(grads[0], [[1.0, 0.5, 0, 0]])
  # h = -q' inside [0,1]: dα = 2·(1-.4) + 1·(1-.3) = 1.9; dα2 = α·ΣT1; dα3 = α·ΣT2.
  np.testing.assert_allclose([grads[1], grads[2], grads[3]], [1.9, 0.5, 0.5], rtol=1e-6)


def test_gsb_alpha_below_floor_and_rounding_to_one():
  p = jnp.array([[0.6, 0.4]])
  args = (jnp.array(1e-7), jnp.array(-1.0), jnp.array(1.0))
  # q = p/1e-7 (raw α): both round to 1; T2 = T1 = [1, 0]; T0 = [0, 1]; α and α2 floored.
  out = q.gsb_quantize(p, *args)
  np.testing.assert_allclose(out, [[1e-5, 1e-5]], rtol=1e-6)
  d_alpha, d_alpha2 = jax.grad(lambda a, b, c: jnp.sum(q.gsb_quantize(p, a, b, c)),
                               argnums=(0, 1))(*args)
  np.testing.assert_allclose(d_alpha, 2.0, rtol=1e-6)  # q' = p/1e-5 > 1 so h = 0
  np.testing.assert_allclose(d_alpha2, 0.0)


def test_lsq_quantize_values_and_gradients():
  x = jnp.array([0.1, 0.4, 0.9, 1.6, 2.0]).reshape(1, 1, 1, 5)
  alpha, zero = jnp.array([0.5]), jnp.array([0.2])
  # u = x/α + z = [.4, 1.0, 2.0, 3.4, 4.2]; round = [0, 1, 2, 3, 4]; clip -> [0,1,2,3,3].
  out = q.lsq_quantize(x, alpha, zero)
  np.testing.assert_allclose(out.ravel(), [0, 0.5, 1.0, 1.5, 1.5], rtol=1e-6)
  dx, da, dz = jax.grad(lambda *a: jnp.sum(q.lsq_quantize(*a)), argnums=(0, 1, 2))(
      x, alpha, zero)
  mask = np.array([1, 1, 1, 1, 0.0])  # rounded value in [0, 3], bounds included
  np.testing.assert_allclose(dx.ravel(), mask, rtol=1e-6)
  g = 1 / math.sqrt(5 * 3)  # heads / sqrt(numel · Qp)
  levels = np.array([0, 1, 2, 3, 3.0])
  expected_da = np.sum(levels - mask * np.asarray(x).ravel() / 0.5) * g
  np.testing.assert_allclose(da, [expected_da], rtol=1e-5)
  np.testing.assert_allclose(dz, [np.sum(mask) * 0.5 * g], rtol=1e-5)


def test_lsq_calibration_of_uniform_attention():
  nk = 49 + 4
  x = 3 * jnp.full((2, 3, 7, nk), 1.0 / nk)
  alpha, zero = q.lsq_calibrate(x, jnp.array([0.0, 1.0, -1.0]))
  np.testing.assert_allclose(alpha, [2 * math.sqrt(3) / nk] * 3, rtol=1e-6)
  np.testing.assert_allclose(zero, 0.1 * 3 / nk + 0.9 * np.array([0.0, 1.0, -1.0]), rtol=1e-6)


@pytest.mark.parametrize('fn', [
    q.sign_ste, q.binarize_weight, lambda w: q.binarize_weight(w, recu=True),
    lambda p: q.gsb_quantize(p, jnp.array(0.01), jnp.array(1.0), jnp.array(1.0)),
    lambda p: q.lsq_quantize(p[None, None], jnp.ones(1), jnp.zeros(1))])
def test_quantizers_keep_dtype_and_compose_with_transforms(fn):
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 6, 8), minval=-0.2, maxval=1.0)
  for dtype in (jnp.float32, jnp.bfloat16):
    assert fn(x.astype(dtype)).dtype == dtype
  loss = lambda v: jnp.sum(fn(v) ** 2)
  g_plain = jax.grad(loss)(x)
  np.testing.assert_allclose(jax.jit(jax.grad(jax.checkpoint(loss)))(x), g_plain,
                             rtol=1e-4, atol=1e-5)
  per_row = jax.vmap(jax.grad(lambda v: jnp.sum(fn(v[None]) ** 2)))(x)
  assert per_row.shape == x.shape and np.all(np.isfinite(per_row))


def test_int8_sign_products_equal_the_bfloat16_ones(monkeypatch):
  """The accelerator option (int8 operands, int32 accumulation) gives the default's numbers."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 6, 40)), jnp.float32).at[0, 0, :5].set(0.0)
  w = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)

  def outputs():
    f = lambda x, w: jnp.sum(q.binary_matmul(x, w, 1, 1) ** 2)
    return jax.jit(lambda x, w: (q.binary_matmul(x, w, 1, 1), jax.grad(f, (0, 1))(x, w)))(x, w)

  default = outputs()
  monkeypatch.setitem(q.SIGN_PRODUCT, jax.default_backend(), 'int8')
  int8 = outputs()
  lowered = jax.jit(lambda x, w: q.binary_matmul(x, w, 1, 1)).lower(x, w).as_text()
  assert 'xi8>' in lowered and 'xi32>' in lowered  # the int8 product is the one compiled
  chex.assert_trees_all_equal(default, int8)
  want = (np.sign(np.asarray(x)) @ np.sign(np.asarray(w - w.mean(0)))) * np.abs(w).mean(0)
  np.testing.assert_allclose(int8[0], want, rtol=1e-6)
