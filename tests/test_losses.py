"""Losses against values computed by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import losses


def test_label_smoothing_three_classes_by_hand():
  logits = jnp.array([[1.0, 2.0, 0.0]])
  z = math.exp(1) + math.exp(2) + math.exp(0)
  log_p = [1 - math.log(z), 2 - math.log(z), -math.log(z)]
  eps = 0.1
  target = [eps / 3, (1 - eps) + eps / 3, eps / 3]  # label 1
  expected = -sum(t * lp for t, lp in zip(target, log_p))
  got = losses.cross_entropy(logits, jnp.array([1]), label_smoothing=eps)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([1])), -log_p[1], rtol=1e-6)


def test_distillation_by_hand_and_no_teacher_gradient():
  student = jnp.array([[0.0, 1.0], [2.0, 0.0]])
  teacher = jnp.array([[0.0, 0.0], [0.0, math.log(3.0)]])  # softmax: [.5,.5], [.25,.75]
  ls = lambda a, b: [a - math.log(math.exp(a) + math.exp(b)), b - math.log(math.exp(a) + math.exp(b))]
  s0, s1 = ls(0.0, 1.0), ls(2.0, 0.0)
  expected = -(0.5 * s0[0] + 0.5 * s0[1] + 0.25 * s1[0] + 0.75 * s1[1]) / 2
  np.testing.assert_allclose(losses.distillation(student, teacher), expected, rtol=1e-6)
  assert not jnp.any(jax.grad(lambda t: losses.distillation(student, t))(teacher))


def _params():
  return {
      'layerA_0': {'GC': {'cov1': {'kernel': jnp.array([[0.5, -2.0], [0.0, 1.0]]),
                                   'bias': jnp.array([3.0, 3.0])}}},
      'layerB_0': {'query': {'kernel': jnp.array([1.5, -0.25, 1.0])}},
      'patch_embed1': {'proj': {'kernel': jnp.full((2, 2), 5.0)}},
      'classifier': {'kernel': jnp.full((2, 2), 7.0)},
  }


def test_regularizer_mask_selects_binary_kernels_only():
  mask = losses.regularizer_mask(_params())
  assert mask['layerA_0']['GC']['cov1'] == {'kernel': True, 'bias': False}
  assert mask['layerB_0']['query']['kernel']
  assert not mask['patch_embed1']['proj']['kernel'] and not mask['classifier']['kernel']


def test_regularizer_value_and_torch_gradient():
  params = _params()
  # cov1: |.5-1|+|2-1|+|0-1|+|1-1| = 2.5 over 4; query: .5+.75+0 = 1.25 over 3.
  expected = (2.5 / 4 + 1.25 / 3) / 2
  np.testing.assert_allclose(losses.oscillation_regularizer(params), expected, rtol=1e-6)
  grads = jax.grad(losses.oscillation_regularizer)(params)
  # sign(W)·sign(|W|−1)/numel/num_layers with sign(0) = 0 at W = 0 and at |W| = 1.
  np.testing.assert_allclose(grads['layerA_0']['GC']['cov1']['kernel'],
                             np.array([[-1, -1], [0, 0]]) / 4 / 2)
  np.testing.assert_allclose(grads['layerB_0']['query']['kernel'], np.array([1, 1, 0]) / 3 / 2)
  assert not jnp.any(grads['classifier']['kernel'])


def test_regularizer_rejects_empty_selection():
  with pytest.raises(ValueError, match='no parameter matches'):
    losses.oscillation_regularizer({'classifier': {'kernel': jnp.ones((2, 2))}})


def test_total_loss_composition():
  logits, labels = jnp.array([[2.0, 0.0]]), jnp.array([0])
  teacher = jnp.array([[0.0, 1.0]])
  ce = losses.cross_entropy(logits, labels, 0.1)
  kd = losses.distillation(logits, teacher)
  alone, _ = losses.total_loss(logits, labels, label_smoothing=0.1, ce_weight=0.3)
  np.testing.assert_allclose(alone, ce, rtol=1e-6)
  mixed, parts = losses.total_loss(logits, labels, teacher, label_smoothing=0.1, ce_weight=0.1,
                                   distill_weight=0.8)
  np.testing.assert_allclose(mixed, 0.1 * ce + 0.8 * kd, rtol=1e-6)
  np.testing.assert_allclose(parts['kd'], kd, rtol=1e-6)
