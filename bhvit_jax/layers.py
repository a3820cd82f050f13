"""Building blocks of BHViT in Flax linen (NHWC, tokens `[B, N, C]` in row-major (h, w) order).

Initializers follow PyTorch's defaults (the reference's own init never runs), so a model trained
here from scratch starts where the reference does.
"""
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bhvit_jax import quantizers
from bhvit_jax import fastpath

EPS = 1e-5
Dtype = Any


def torch_uniform(fan_in_axes: Sequence[int]) -> Callable:
  """PyTorch's default weight/bias init: uniform(±1/sqrt(fan_in))."""

  def init(key, shape, dtype=jnp.float32, fan_in=None):
    fan_in = fan_in or math.prod(shape[a] for a in fan_in_axes)
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _bias_init(fan_in):
  return lambda key, shape, dtype=jnp.float32: torch_uniform(())(key, shape, dtype, fan_in)


class BinaryDense(nn.Module):
  """Linear layer with optional 1-bit weights and 1-bit inputs.

  Attributes:
    features: output width.
    weight_bits / input_bits: 1 (binarized) or 32 (plain float).
    recu: ReCU weight normalization (docs/reference.md §2).
    use_bias: the reference's binary linears have none; the classifier has one.
    channel_axes: how many trailing axes of the input form its channels (`channel_param`);
      the kernel is `[in, out]` either way.
  """
  features: int
  weight_bits: int = 1
  input_bits: int = 1
  recu: bool = False
  use_bias: bool = False
  channel_axes: int = 1
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x):
    """`[..., in]` (or `[..., k, in/k]`) -> `[..., features]`."""
    channels = x.shape[x.ndim - self.channel_axes:]
    fan_in = math.prod(channels)
    kernel = self.param('kernel', torch_uniform((0,)), (fan_in, self.features))
    dtype = self.dtype or x.dtype
    y = quantizers.binary_matmul(x.astype(dtype), kernel.reshape(channels + (self.features,)),
                                 self.input_bits, self.weight_bits, self.recu)
    if self.use_bias:
      y = y + self.param('bias', _bias_init(fan_in), (self.features,)).astype(dtype)
    return y


class BinaryConv(nn.Module):
  """2-D convolution with optional 1-bit weights/inputs; NHWC, kernel HWIO `[kh, kw, C/g, O]`.

  Attributes:
    padding: symmetric zero padding on each side (PyTorch's `padding='same'` for odd kernels
      with dilation d is `d * (k // 2)`).
    split_groups: compute a grouped conv as one conv per group (`fastpath.per_group_conv`).
  """
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  groups: int = 1
  padding: int = 0
  weight_bits: int = 1
  input_bits: int = 1
  use_bias: bool = True
  split_groups: bool = False
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x):
    """`[B, H, W, C]` -> `[B, H', W', features]`."""
    in_per_group = x.shape[-1] // self.groups
    k = self.kernel_size
    fan_in = in_per_group * k * k
    kernel = self.param('kernel', torch_uniform((0, 1, 2)), (k, k, in_per_group, self.features))
    kernel = quantizers.maybe_binarize_weight(kernel, self.weight_bits)
    x = quantizers.maybe_sign(x, self.input_bits)
    dtype = self.dtype or x.dtype
    y = self._conv(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param('bias', _bias_init(fan_in), (self.features,)).astype(dtype)
    return y

  def _conv(self, x, kernel):
    conv = lambda lhs, rhs, groups: jax.lax.conv_general_dilated(
        lhs, rhs, window_strides=(self.stride,) * 2,
        padding=[(self.padding, self.padding)] * 2, rhs_dilation=(self.dilation,) * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)
    if self.groups > 1 and self.split_groups:
      return fastpath.per_group_conv(conv, x, kernel, self.groups)
    return conv(x, kernel, self.groups)


def channel_param(module: nn.Module, name: str, init: Callable, x, channel_axes: int = 1):
  """A per-channel parameter, stored flat `[C]` and shaped as x's trailing `channel_axes` axes.

  The channels of x may be laid out over several trailing axes (as flax's `feature_axes`),
  e.g. a `[..., k, C/k]` view of a wide activation (`fastpath.ChannelLayout`); the parameters
  keep the reference's flat layout either way.
  """
  shape = x.shape[x.ndim - channel_axes:]
  return module.param(name, init, (math.prod(shape),)).reshape(shape).astype(x.dtype)


class RPReLU(nn.Module):
  """`PReLU_c(x - move1) + move2` over the channel axes (slope init 0.25)."""
  channel_axes: int = 1

  @nn.compact
  def __call__(self, x):
    param = lambda name, init: channel_param(self, name, init, x, self.channel_axes)
    move1 = param('move1', nn.initializers.zeros)
    slope = param('prelu', nn.initializers.constant(0.25))
    move2 = param('move2', nn.initializers.zeros)
    x = x - move1
    return jnp.where(x >= 0, x, slope * x) + move2


class LayerScale(nn.Module):
  """`x * alpha + move` over the channel axes."""
  init_value: float = 0.1
  channel_axes: int = 1

  @nn.compact
  def __call__(self, x):
    alpha = channel_param(self, 'alpha', nn.initializers.constant(self.init_value), x,
                          self.channel_axes)
    return x * alpha + channel_param(self, 'move', nn.initializers.zeros, x, self.channel_axes)


class Bias(nn.Module):
  """A learnable per-channel offset `x + bias` (the reference's `move` parameters)."""
  param_name: str = 'bias'

  @nn.compact
  def __call__(self, x):
    return x + channel_param(self, self.param_name, nn.initializers.zeros, x)


class TokenNorm(nn.Module):
  """The reference's token norm over the channel axes, eps 1e-5.

  `kind='batch'`: BatchNorm over all other axes with PyTorch's semantics: training normalizes
  with the biased batch variance and updates the running statistics with momentum 0.1 and the
  *unbiased* variance. Under `jit` with a sharded batch the means are over the global batch,
  as PyTorch's SyncBatchNorm. `kind='layer'`: LayerNorm with a two-pass variance.
  `channel_axes`: trailing axes that form the channels (`channel_param`); parameters and
  statistics are stored flat.
  """
  kind: str = 'batch'
  momentum: float = 0.1
  channel_axes: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    stats_x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    param = lambda name, init: channel_param(self, name, init, stats_x, self.channel_axes)
    scale, bias = param('scale', nn.initializers.ones), param('bias', nn.initializers.zeros)
    first_channel = x.ndim - self.channel_axes
    if self.kind == 'layer':
      mean, var = _moments(stats_x, tuple(range(first_channel, x.ndim)), keepdims=True)
      y = _normalize(stats_x, mean, var, scale, bias)
    elif train:
      y, mean, var = batch_norm(stats_x, scale, bias, first_channel)
      self._track(mean, var, x.size // mean.size)
    else:
      mean, var = (v.value.reshape(scale.shape).astype(stats_x.dtype)
                   for v in self._running_stats(scale.size)[:2])
      y = _normalize(stats_x, mean, var, scale, bias)
    return y.astype(x.dtype)

  def _running_stats(self, c):
    """The BatchNorm variables `(mean, var, num_batches_tracked)` of c channels, created in
    every mode."""
    return (self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32),
            self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32),
            self.variable('batch_stats', 'num_batches_tracked', jnp.zeros, (), jnp.int32))

  def _track(self, mean, var, n):
    """PyTorch's running-statistics update (momentum, unbiased variance)."""
    running_mean, running_var, count = self._running_stats(mean.size)
    if self.is_initializing():
      return
    m = self.momentum
    for stat, batch in ((running_mean, mean), (running_var, var * (n / (n - 1)))):
      stat.value = ((1 - m) * stat.value + m * batch.reshape(-1)).astype(stat.value.dtype)
    count.value = count.value + 1


def _normalize(x, mean, var, scale, bias):
  return (x - mean) * jax.lax.rsqrt(var + EPS) * scale + bias


def _moments(x, axes, keepdims=False):
  mean = jnp.mean(x, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=keepdims)
  return (mean if keepdims else jnp.squeeze(mean, axes)), var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x, scale, bias, first_channel):
  """Training-mode BatchNorm: `(x - mean) / sqrt(var + eps) * scale + bias`.

  Statistics are over the axes before `first_channel` (biased variance). Returns
  `(y, mean, var)`. The gradient is written out so that the backward pass keeps only x and
  two per-channel vectors; autodiff keeps ~4 tensors of x's size per norm.
  """
  mean, var = _moments(x, tuple(range(first_channel)))
  return _normalize(x, mean, var, scale, bias), mean, var


def _batch_norm_fwd(x, scale, bias, first_channel):
  x, scale, bias = x.value, scale.value, bias.value
  y, mean, var = batch_norm(x, scale, bias, first_channel)
  return (y, mean, var), (x, mean, jax.lax.rsqrt(var + EPS), scale)


def _batch_norm_bwd(first_channel, residuals, cotangents):
  x, mean, inv, scale = residuals
  gy, gmean, gvar = cotangents
  axes = tuple(range(first_channel))
  xhat = (x - mean) * inv
  gxhat = gy * scale
  dx = inv * (gxhat - jnp.mean(gxhat, axes) - xhat * jnp.mean(gxhat * xhat, axes))
  # The statistics usually feed only the running averages: their cotangents are then
  # symbolic zeros and cost nothing.
  n = x.size // mean.size
  if not isinstance(gmean, jax.custom_derivatives.SymbolicZero):
    dx = dx + gmean / n
  if not isinstance(gvar, jax.custom_derivatives.SymbolicZero):
    dx = dx + gvar * (2 / n) * (x - mean)
  return dx, jnp.sum(gy * xhat, axes), jnp.sum(gy, axes)


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd, symbolic_zeros=True)


class ShiftScale(nn.Module):
  """The `(alpha, move)` of one shift path's LayerScale (init 0), each `[C]`."""

  @nn.compact
  def __call__(self, x):
    return (channel_param(self, 'alpha', nn.initializers.zeros, x),
            channel_param(self, 'move', nn.initializers.zeros, x))


def shift_residuals(x, scales, fast: bool = False):
  """The reference's shift paths, `sum(shift(x) * alpha + move)` (docs/reference.md §4).

  Paths, keyed `(kind, reach)`: `'h'`/`'w'` is the mean of x rolled by every offset in
  {0, ±1, …, ±reach} (circular) along H/W; `'ch'` rolls four contiguous channel groups of x
  by +reach/-reach along H, then by +reach/-reach along W. `fast`: the same sum folded into
  one stencil (`fastpath.folded_shifts`).

  Args:
    x: `[B, H, W, C]`, C divisible by 4.
    scales: `{(kind, reach): (alpha, move)}`, each `[C]`.
  Returns: `[B, H, W, C]`, the sum over all paths.
  """
  if fast:
    return fastpath.folded_shifts(x, scales)
  total = 0
  for (kind, reach), (alpha, move) in scales.items():
    if kind == 'ch':
      groups = jnp.split(x, 4, axis=-1)
      rolls = ((1, reach), (1, -reach), (2, reach), (2, -reach))
      path = jnp.concatenate([jnp.roll(g, s, axis=a) for g, (a, s) in zip(groups, rolls)], -1)
    else:
      axis = {'h': 1, 'w': 2}[kind]
      path = sum(jnp.roll(x, s, axis=axis) for s in range(-reach, reach + 1)) / (2 * reach + 1)
    total = total + path * alpha + move
  return total


def drop_path(x, rate: float, deterministic: bool, rng_owner: nn.Module):
  """Per-sample stochastic depth: drop the whole branch with probability `rate`."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  rng = rng_owner.make_rng('dropout')
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)
