"""The 1-bit quantizers of BHViT as pure JAX functions.

Every function keeps the dtype of its input and works under `jit`, `grad`, `vmap` and
`jax.checkpoint`. Where the reference defines its own backward rule, the rule is written as a
`jax.custom_vjp`; the formulas follow SPEC.md §2 exactly (inclusive clip masks, gradients of the
weight straight-through estimator *not* multiplied by the scale, α floored at 1e-5).
"""
import math

import jax
import jax.numpy as jnp

ALPHA_FLOOR = 1e-5
LSQ_LEVELS = 3  # 3-bit unsigned LSQ of the reference: Qp = 2**(3-1) - 1.


@jax.custom_vjp
def sign_ste(x):
  """Activation sign with sign(0) = 0 and the approximate-sign (Bi-Real) gradient."""
  return jnp.sign(x)


def _sign_ste_fwd(x):
  return jnp.sign(x), x


def _sign_ste_bwd(x, g):
  slope = jnp.where((x >= -1) & (x <= 0), 2 + 2 * x, 0)
  slope = jnp.where((x > 0) & (x <= 1), 2 - 2 * x, slope)
  return (g * slope.astype(g.dtype),)


sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


@jax.custom_vjp
def clip_inclusive(x, lo, hi):
  """`clip(x, lo, hi)` whose gradient passes where lo <= x <= hi, bounds included (as torch.clamp)."""
  return jnp.clip(x, lo, hi)


def _clip_inclusive_fwd(x, lo, hi):
  return jnp.clip(x, lo, hi), (x, lo, hi)


def _clip_inclusive_bwd(res, g):
  x, lo, hi = res
  mask = (x >= lo) & (x <= hi)
  return g * mask.astype(g.dtype), jnp.zeros_like(lo), jnp.zeros_like(hi)


clip_inclusive.defvjp(_clip_inclusive_fwd, _clip_inclusive_bwd)


@jax.custom_vjp
def _scaled_sign_clip_grad(w, scale, bound):
  """Forward `scale * sign(w)`; backward the gradient of clip(w, -bound, bound) alone."""
  return scale * jnp.sign(w)


def _scaled_sign_fwd(w, scale, bound):
  return scale * jnp.sign(w), (w, scale, bound)


def _scaled_sign_bwd(res, g):
  w, scale, bound = res
  mask = jnp.abs(w) <= bound
  return g * mask.astype(g.dtype), jnp.zeros_like(scale), jnp.zeros_like(bound)


_scaled_sign_clip_grad.defvjp(_scaled_sign_fwd, _scaled_sign_bwd)


def binarize_weight(w, recu=False):
  """Binarizes a kernel per output channel (the last axis), SPEC §2.

  Args:
    w: latent kernel, `[..., out]` (Dense `[in, out]`, conv HWIO `[kh, kw, in/g, out]`).
    recu: ReCU normalization (the reference uses it in linear layers only).
  Returns:
    `s_o * sign(Wc)` with the straight-through gradient through the clip and the centring.
  """
  axes = tuple(range(w.ndim - 1))
  scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=axes, keepdims=True))
  centred = w - jnp.mean(w, axis=axes, keepdims=True)
  if not recu:
    return _scaled_sign_clip_grad(centred, scale, jnp.ones((), w.dtype))
  std = jnp.sqrt(jnp.var(centred, axis=axes, ddof=1, keepdims=True) + 1e-5)
  normalized = centred / (std / (2 * math.sqrt(2)))
  tau = jax.lax.stop_gradient(-jnp.mean(jnp.abs(normalized)) * math.log(2 - 2 * 0.92))
  return _scaled_sign_clip_grad(normalized, scale, tau)


def maybe_binarize_weight(w, bits, recu=False):
  """Identity for 32-bit weights, `binarize_weight` for 1-bit ones."""
  return binarize_weight(w, recu) if bits == 1 else w


def maybe_sign(x, bits):
  """Identity for 32-bit inputs, `sign_ste` for 1-bit ones."""
  return sign_ste(x) if bits == 1 else x


def _gsb_masks(p, alpha):
  """The three 0/1 maps of quantization decomposition (T0 may be -1, SPEC §2)."""
  q = p / alpha
  rounded = jnp.clip(jnp.round(q), 0, 1)
  row_max = jnp.max(q, axis=-1, keepdims=True)
  t2 = (q > 0.9 * row_max).astype(p.dtype)
  t1 = (q > 0.7 * row_max).astype(p.dtype)
  return rounded - t1, t1 - t2, t2


def _floored(*alphas):
  return tuple(jnp.maximum(a, ALPHA_FLOOR) for a in alphas)


@jax.custom_vjp
def gsb_quantize(p, alpha, alpha2, alpha3):
  """Quantization-decomposition attention quantizer.

  Args:
    p: softmax probabilities `[..., Nq, Nk]`.
    alpha, alpha2, alpha3: learnable scalars (α as stored; floored at 1e-5 for use).
  Returns:
    `(T0 + α2·T1 + α3·T2)·α`, same shape and dtype as `p`.
  """
  return _gsb_forward(p, alpha, alpha2, alpha3)[0]


def _gsb_forward(p, alpha, alpha2, alpha3):
  t0, t1, t2 = _gsb_masks(p, alpha.astype(p.dtype))
  a1, a2, a3 = (a.astype(p.dtype) for a in _floored(alpha, alpha2, alpha3))
  weights = t0 + a2 * t1 + a3 * t2
  return weights * a1, (t0, t1, t2, weights, a1)


def _gsb_fwd(p, alpha, alpha2, alpha3):
  out, (t0, t1, t2, weights, a1) = _gsb_forward(p, alpha, alpha2, alpha3)
  return out, (p, t1, t2, weights, a1, alpha)


def _gsb_bwd(res, g):
  p, t1, t2, weights, a1, alpha = res
  q = p / a1
  h = jnp.where((q >= 0) & (q <= 1), -q, 0)
  d_alpha = jnp.sum(weights * (1 + h) * g)
  d_alpha2 = jnp.sum(a1 * t1 * g)
  d_alpha3 = jnp.sum(a1 * t2 * g)
  cast = lambda v: v.astype(alpha.dtype)
  return a1 * weights * g, cast(d_alpha), cast(d_alpha2), cast(d_alpha3)


gsb_quantize.defvjp(_gsb_fwd, _gsb_bwd)


def gsb_maps(p, alpha):
  """The maps (T0, T1, T2) used by `gsb_quantize`, for inspection and plots."""
  return _gsb_masks(p, alpha)


def _round_ste(x):
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _grad_scale(x, scale):
  """Value of x, gradient multiplied by `scale` (LSQ's step-size gradient scaling)."""
  return x * scale + jax.lax.stop_gradient(x - x * scale)


def lsq_quantize(x, alpha, zero_point):
  """3-level LSQ attention quantizer of the non-gsb reference (per head).

  Args:
    x: `3 · P`, `[N, heads, Nq, Nk]`.
    alpha, zero_point: `[heads]`.
  Returns:
    `clip(round(x/α + z), 0, 3)·α` (the zero point is not subtracted after rounding).
  """
  heads = x.shape[1]
  g = heads / math.sqrt(x.size * LSQ_LEVELS)
  shape = (1, heads, 1, 1)
  a = _grad_scale(alpha, g).astype(x.dtype).reshape(shape)
  z = _grad_scale(zero_point, g).astype(x.dtype).reshape(shape)
  levels = clip_inclusive(_round_ste(x / a + z), jnp.zeros((), x.dtype),
                          jnp.asarray(LSQ_LEVELS, x.dtype))
  return levels * a


def lsq_calibrate(x, zero_point):
  """First-batch calibration of `lsq_quantize` as a pure function (no gradient).

  Args:
    x: `3 · P`, `[N, heads, Nq, Nk]`.
    zero_point: the current zero point `[heads]`.
  Returns:
    `(alpha, zero_point)`, each `[heads]`, as the reference sets them on its first training
    forward.
  """
  x = jax.lax.stop_gradient(x)
  mean_abs = jnp.mean(jnp.mean(jnp.mean(jnp.abs(x), axis=-1), axis=-1), axis=0)
  alpha = 2 * mean_abs / math.sqrt(LSQ_LEVELS)
  minimum = jnp.min(x, axis=(0, 2, 3))
  return alpha.astype(zero_point.dtype), (0.9 * zero_point + 0.1 * minimum).astype(
      zero_point.dtype)
