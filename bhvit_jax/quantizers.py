"""The 1-bit quantizers of BHViT as pure JAX functions.

Every function keeps the dtype of its input and works under `jit`, `grad`, `vmap` and
`jax.checkpoint`. Where the reference defines its own backward rule, the rule is written as a
`jax.custom_vjp`; the formulas follow docs/reference.md §2 exactly (inclusive clip masks, gradients of the
weight straight-through estimator *not* multiplied by the scale, α floored at 1e-5).
"""
import functools
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


def _approx_sign_grad(x, g):
  slope = jnp.where((x >= -1) & (x <= 0), 2 + 2 * x, 0)
  slope = jnp.where((x > 0) & (x <= 1), 2 - 2 * x, slope)
  return g * slope.astype(g.dtype)


def _sign_ste_bwd(x, g):
  return (_approx_sign_grad(x, g),)


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


def _weight_parts(w, recu):
  """`(latent, scale, bound)`: the kernel whose sign is used, s_o, and the STE clip bound."""
  axes = tuple(range(w.ndim - 1))
  scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=axes, keepdims=True))
  centred = w - jnp.mean(w, axis=axes, keepdims=True)
  if not recu:
    return centred, scale, jnp.ones((), w.dtype)
  std = jnp.sqrt(jnp.var(centred, axis=axes, ddof=1, keepdims=True) + 1e-5)
  normalized = centred / (std / (2 * math.sqrt(2)))
  tau = jax.lax.stop_gradient(-jnp.mean(jnp.abs(normalized)) * math.log(2 - 2 * 0.92))
  return normalized, scale, tau


def weight_signs(w):
  """The signs binarization takes (of the kernel centred per output channel), float32."""
  return jnp.sign(_weight_parts(w.astype(jnp.float32), False)[0])


def binarize_weight(w, recu=False):
  """Binarizes a kernel per output channel (the last axis), docs/reference.md §2.

  Args:
    w: latent kernel, `[..., out]` (Dense `[in, out]`, conv HWIO `[kh, kw, in/g, out]`).
    recu: ReCU normalization (the reference uses it in linear layers only).
  Returns:
    `s_o * sign(Wc)` with the straight-through gradient through the clip and the centring.
  """
  return _scaled_sign_clip_grad(*_weight_parts(w, recu))


def _contract(a, b, preferred_element_type=None):
  """`a [..., *K] · b [*K, O] -> [..., O]`, contracting b's leading axes."""
  n = b.ndim - 1
  dims = ((tuple(range(a.ndim - n, a.ndim)), tuple(range(n))), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=preferred_element_type)


def _sign_operand(x):
  """sign(x) as a matmul operand: bfloat16 holds {-1, 0, 1} exactly, and float32 accumulation
  of such products is exact, so float32 models multiply signs at half the memory traffic."""
  return jnp.sign(x).astype(jnp.bfloat16 if x.dtype in (jnp.float32, jnp.bfloat16) else x.dtype)


# How each backend multiplies {-1, 0, 1} operands; both are exact (integer sums accumulated in
# float32 below 2**24 terms, or in int32). int8 operands with int32 accumulation run at twice
# bfloat16's peak on GPU tensor cores and TPU MXUs; a backend switches to 'int8' once
# tools/benchmark.py measures it faster there (docs/performance.md). Unlisted: 'bfloat16'.
SIGN_PRODUCT = {'cpu': 'bfloat16'}


def _sign_product(a, w_sign, out_dtype):
  """sign(x) `[..., *K]` · sign(W) `[*K, O]` in `out_dtype`, with the backend's operand type."""
  if SIGN_PRODUCT.get(jax.default_backend(), 'bfloat16') == 'int8':
    return _contract(a.astype(jnp.int8), w_sign.astype(jnp.int8), jnp.int32).astype(out_dtype)
  return _contract(a, w_sign.astype(a.dtype), out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _binary_matmul(x, latent, scale, bound, sign_input):
  if sign_input:
    y = _sign_product(_sign_operand(x), jnp.sign(latent),
                      jnp.promote_types(x.dtype, jnp.float32))
  else:
    y = _contract(x, jnp.sign(latent).astype(x.dtype))
  return y.astype(x.dtype) * scale.reshape(-1).astype(x.dtype)


def _binary_matmul_fwd(x, latent, scale, bound, sign_input):
  return _binary_matmul(x, latent, scale, bound, sign_input), (x, latent, scale, bound)


def _weight_grad(a, g, mask):
  """`(aᵀ g) ⊙ mask` for a `[N, K]`, g `[N, O]`.

  XLA's CPU matmul wants the product's shorter side first: the other orientation makes it
  transpose the wide operand in memory (much slower on the wide MLP activations). The barrier
  keeps the small transpose back from being folded into the product.
  """
  if a.shape[1] <= g.shape[1]:
    return jnp.dot(a.T, g) * mask
  return jax.lax.optimization_barrier(jnp.dot(g.T, a) * mask.T).T


def _binary_matmul_bwd(sign_input, res, g):
  x, latent, scale, bound = res
  n = latent.ndim - 1
  gs = g * scale.reshape(-1).astype(g.dtype)
  contract_out = (((g.ndim - 1,), (n,)), ((), ()))
  gx = jax.lax.dot_general(gs, jnp.sign(latent).astype(g.dtype), contract_out)
  if sign_input:
    gx = _approx_sign_grad(x, gx)
  wide = jnp.promote_types(g.dtype, latent.dtype)
  # The same sign operand as the forward pass, so XLA materializes it once.
  a = (_sign_operand(x) if sign_input else x).astype(wide)
  a = a.reshape(-1, math.prod(latent.shape[:-1]))
  g = g.astype(wide).reshape(-1, latent.shape[-1])
  mask = (jnp.abs(latent) <= bound).astype(wide).reshape(a.shape[1], g.shape[1])
  return (gx, _weight_grad(a, g, mask).reshape(latent.shape).astype(latent.dtype),
          jnp.zeros_like(scale), jnp.zeros_like(bound))


_binary_matmul.defvjp(_binary_matmul_fwd, _binary_matmul_bwd)


def binary_matmul(x, w, input_bits, weight_bits, recu=False):
  """`maybe_sign(x) · maybe_binarize_weight(w)`: x `[..., *K]`, kernel w `[*K, O]`.

  With 1-bit weights the product is computed as `(x' · sign(Wc))·s_o` in one custom gradient
  that saves only x (the bfloat16 sign of x serves the product and the weight gradient); the
  gradients are those of the composed quantizers (approx-sign for x, unscaled clipped STE for
  w). The binarization statistics (s_o, centring, ReCU) are over all of the kernel's fan-in
  axes.
  """
  if weight_bits != 1:
    return _contract(maybe_sign(x, input_bits), w.astype(x.dtype))
  shape = w.shape
  latent, scale, bound = _weight_parts(w.reshape(-1, shape[-1]), recu)
  return _binary_matmul(x, latent.reshape(shape), scale, bound, input_bits == 1)


def maybe_binarize_weight(w, bits, recu=False):
  """Identity for 32-bit weights, `binarize_weight` for 1-bit ones."""
  return binarize_weight(w, recu) if bits == 1 else w


def maybe_sign(x, bits):
  """Identity for 32-bit inputs, `sign_ste` for 1-bit ones."""
  return sign_ste(x) if bits == 1 else x


def _gsb_masks(p, alpha):
  """The three 0/1 maps of quantization decomposition (T0 may be -1, docs/reference.md §2)."""
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
  count = x.size * LSQ_LEVELS
  # A symbolic batch (jax.export with a dynamic batch dimension) makes the count a traced value.
  g = heads / (math.sqrt(count) if isinstance(count, int) else
               jnp.sqrt(jnp.asarray(count, jnp.float32)))
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
