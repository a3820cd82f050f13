"""Losses of the BHViT recipe (docs/reference.md §5): label-smoothed CE, distillation, oscillation regularizer."""
from typing import Any, Optional

import jax
import jax.numpy as jnp

from bhvit_jax import model as model_lib

PyTree = Any


def cross_entropy(logits, labels, label_smoothing=0.0):
  """Mean cross-entropy with PyTorch's label smoothing.

  Args:
    logits: [B, K] float.
    labels: [B] int class ids.
    label_smoothing: ε; the target is (1 − ε)·onehot + ε/K.
  Returns:
    scalar float32.
  """
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  target = jax.nn.one_hot(labels, num_classes, dtype=log_probs.dtype)
  target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
  return -jnp.mean(jnp.sum(target * log_probs, axis=-1))


def soft_cross_entropy(logits, targets):
  """Mean cross-entropy against soft targets (mixup/cutmix; smoothing already folded in).

  Args:
    logits: [B, K] float.
    targets: [B, K] float, rows summing to 1 (augment.mix_batch).
  Returns:
    scalar float32.
  """
  log_probs = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  return -jnp.mean(jnp.sum(targets.astype(log_probs.dtype) * log_probs, axis=-1))


def distillation(student_logits, teacher_logits):
  """Cross-entropy of the student's log-softmax against the teacher's softmax, batch mean.

  Args:
    student_logits: [B, K]; teacher_logits: [B, K] (no gradient flows into the teacher).
  """
  teacher_probs = jax.nn.softmax(
      _at_least_f32(jax.lax.stop_gradient(teacher_logits)), axis=-1)
  log_probs = jax.nn.log_softmax(_at_least_f32(student_logits), axis=-1)
  return -jnp.mean(jnp.sum(teacher_probs * log_probs, axis=-1))


def _at_least_f32(x):
  """bf16 -> f32 for the loss arithmetic; f64 stays f64 (x64 reference checks)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def regularizer_mask(params: PyTree) -> PyTree:
  """Bool pytree: True on the latent kernels the regularizer pulls to ±1 (the downsampling
  `proj` and the `classifier` are excluded, as in the reference)."""
  return model_lib.binary_kernel_mask(params)


@jax.custom_jvp
def _abs(x):
  return jnp.abs(x)


@_abs.defjvp
def _abs_jvp(primals, tangents):
  # PyTorch differentiates |x| as sign(x) with sign(0) = 0; jnp.abs uses 1 at 0.
  (x,), (t,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * t


def oscillation_regularizer(params: PyTree, mask: Optional[PyTree] = None):
  """R = mean over selected layers of Σ| |W| − 1 | / numel(W) (docs/reference.md §5).

  Args:
    params: parameter pytree.
    mask: bool pytree matching params (default: `regularizer_mask(params)`).
  Returns:
    scalar float32; its gradient is sign(W)·sign(|W| − 1)/numel(W)/num_layers.
  """
  if mask is None:
    mask = regularizer_mask(params)
  selected = [w for w, m in zip(jax.tree_util.tree_leaves(params),
                                jax.tree_util.tree_leaves(mask)) if m]
  if not selected:
    raise ValueError('oscillation_regularizer: no parameter matches the mask; expected `kernel` '
                     f'leaves under modules named {"|".join(model_lib.BINARY_MODULES)}.')
  per_layer = [jnp.mean(_abs(_abs(_at_least_f32(w)) - 1.0)) for w in selected]
  return sum(per_layer) / len(per_layer)


def total_loss(logits, labels, teacher_logits=None, *, label_smoothing=0.0, ce_weight=1.0,
               distill_weight=0.0):
  """Training objective without the regularizer (which the optimizer carries by default).

  Without a teacher: label-smoothed CE. With one: ce_weight·CE + distill_weight·KD; the
  published run is ce_weight=0, distill_weight=1 (KD alone). `labels` is [B] class ids, or
  [B, K] soft targets of mixup/cutmix (smoothing already folded in; label_smoothing unused).

  Returns:
    (loss, {'ce': ..., 'kd': ...}) scalars; 'kd' is 0 without a teacher.
  """
  if labels.ndim == 2:
    ce = soft_cross_entropy(logits, labels)
  else:
    ce = cross_entropy(logits, labels, label_smoothing)
  if teacher_logits is None:
    return ce, {'ce': ce, 'kd': jnp.zeros((), jnp.float32)}
  kd = distillation(logits, teacher_logits)
  return ce_weight * ce + distill_weight * kd, {'ce': ce, 'kd': kd}
