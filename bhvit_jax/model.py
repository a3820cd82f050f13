"""BHViT, the Binarized Hybrid Vision Transformer, in Flax linen (docs/reference.md §4).

Layout is NHWC throughout; `[B, H, W, C]` flattened over (H, W) is exactly the reference's
row-major token order, so no transposes are needed between grid and token views. Module and
parameter names mirror the PyTorch state dict (see `convert.py`).

Variable collections: `params`; `batch_stats` (BatchNorm running statistics);
`quant_state` (the non-gsb attention quantizer's calibration flag); `intermediates` (attention
maps: softmax probabilities and gsb scales, when `apply(..., mutable=['intermediates'])`).
"""
import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bhvit_jax import config_lib
from bhvit_jax import fastpath
from bhvit_jax import layers
from bhvit_jax import quantizers
from bhvit_jax import remat as remat_lib
from bhvit_jax.layers import BinaryConv, BinaryDense, Bias, LayerScale, RPReLU, TokenNorm


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """What every block needs to know about the network's flags."""
  weight_bits: int
  input_bits: int
  norm: str
  recu: bool
  gsb: bool
  shift3: bool
  shift5: bool
  layerscale: bool
  window_size: int
  fast: bool  # the fast paths (`fastpath.enabled`)
  split_groups: bool
  dtype: Any


def _dense(spec, features, name, channel_axes=1):
  return BinaryDense(features, spec.weight_bits, spec.input_bits, spec.recu, name=name,
                     channel_axes=channel_axes, dtype=spec.dtype)


class TokenMixer(nn.Module):
  """Three binary 3x3 grouped convs with dilations 1/3/5 (the reference's `GC`)."""
  spec: BlockSpec

  @nn.compact
  def __call__(self, x, train):
    """`[B, H, W, C]` -> `[B, H, W, C]`."""
    s = self.spec
    c = x.shape[-1]
    x = Bias(name='move')(x)
    total = 0
    for i, dilation in enumerate((1, 3, 5), start=1):
      conv = BinaryConv(c, 3, dilation=dilation, groups=4, padding=dilation,
                        weight_bits=s.weight_bits, input_bits=s.input_bits,
                        split_groups=s.split_groups, dtype=s.dtype, name=f'cov{i}')
      total = total + RPReLU(name=f'act{i}')(conv(x))
    return TokenNorm(s.norm, name='norm')(total, train)


class Projection(nn.Module):
  """`RPReLU(norm(binary_linear(x + move)) + shortcut(x))`, the reference's binary linear unit.

  `shortcut` repeats x along channels when widening and averages runs of channels when
  narrowing (the MLP's shortcuts); equal widths add x itself. On the fast path the wide side
  is computed in a `[..., k, C]` view (`fastpath.ChannelLayout`).
  """
  spec: BlockSpec
  features: int
  layerscale: bool = False

  @nn.compact
  def __call__(self, x, train):
    """`[..., C]` -> `[..., features]`."""
    layout = fastpath.ChannelLayout.of(x.shape[-1], self.features, self.spec.fast)
    xv = layout.input(x)
    move = layers.channel_param(self, 'move', nn.initializers.zeros, xv, layout.in_axes)
    y = _dense(self.spec, self.features, 'dense', layout.in_axes)(xv + move)
    y = norm_residual_act(self, layout.output(y), layout.shortcut(xv, train), train,
                          channel_axes=layout.out_axes)
    y = layout.materialize(y, train)
    if self.layerscale:
      y = LayerScale(name='layerscale', channel_axes=layout.out_axes)(y)
    return layout.flat(y)


def _norm_residual_act(module, y, residual, train, suffix, channel_axes):
  y = TokenNorm(module.spec.norm, name=f'norm{suffix}', channel_axes=channel_axes)(y, train)
  return RPReLU(name=f'rprelu{suffix}', channel_axes=channel_axes)(y + residual)


_recomputed_norm_residual_act = nn.transforms.lift_transform(
    remat_lib.recompute, _norm_residual_act, static_argnums=(2, 3, 4))


def norm_residual_act(module, y, residual, train, suffix='', channel_axes=1):
  """`RPReLU(norm(y) + residual)`, the norms and RPReLUs named `norm{suffix}`, `rprelu{suffix}`.

  In training the chain is recomputed in the backward pass from y and the residual
  (`remat.recompute`): it is elementwise work plus two per-channel reductions, while keeping
  autodiff's intermediates costs ~2 more activations of y's size per use.
  """
  fn = _recomputed_norm_residual_act if train else _norm_residual_act
  return fn(module, y, residual, train, suffix, channel_axes)


def window_partition(x, w):
  """`[B, H, W, C]` -> `[B·(H/w)·(W/w), w·w, C]`, windows and tokens in row-major order."""
  b, h, wd, c = x.shape
  x = x.reshape(b, h // w, w, wd // w, w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, w * w, c)


def window_merge(x, w, b, h, wd):
  """Inverse of `window_partition`: `[B·nW, w·w, C]` -> `[B, H, W, C]`."""
  c = x.shape[-1]
  x = x.reshape(b, h // w, wd // w, w, w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, wd, c)


def pool_global_tokens(x, w, a1):
  """`a1·maxpool + (1−a1)·avgpool` (kernel = stride = w, padding w//2) -> `[B, G·G, C]`."""
  p = w // 2
  b, h, wd, c = x.shape
  gh, gw = (h + 2 * p - w) // w + 1, (wd + 2 * p - w) // w + 1

  def windows(pad_value):
    """The padded input as `[B, G, G, C, w·w]`: each pooling window's values in row order."""
    xp = jnp.pad(x, ((0, 0), (p, max(0, gh * w - h - p)), (p, max(0, gw * w - wd - p)), (0, 0)),
                 constant_values=pad_value)
    view = xp[:, :gh * w, :gw * w].reshape(b, gh, w, gw, w, c)
    return view.transpose(0, 1, 3, 5, 2, 4).reshape(b, gh, gw, c, w * w)

  # Reductions over a view rather than reduce-windows: the average's gradient is a broadcast,
  # where a reduce-window's is another reduce-window, and IREE cannot compile a strided, padded
  # reduce-window (tools/export_deploy.py). The max is taken at the window's first maximum in
  # row order, so at ties its gradient goes to one element as PyTorch's max-pool sends it; the
  # average counts the zero padding.
  values = windows(-jnp.inf)
  first = jnp.argmax(values, axis=-1)[..., None]
  mx = jnp.take_along_axis(values, first, axis=-1)[..., 0]
  avg = jnp.sum(windows(0), axis=-1) / (w * w)
  a1 = a1.astype(x.dtype)
  pooled = a1 * mx + (1.0 - a1) * avg
  return pooled.reshape(b, -1, c)


class TokenFA(nn.Module):
  """Window tokens plus the image's pooled global tokens, LayerNorm-ed (`token_FA`)."""
  window_size: int

  @nn.compact
  def __call__(self, x):
    """`[B, H, W, C]` -> `[B·nW, w·w + G·G, C]` with nW = (H/w)·(W/w) windows, G = H/w."""
    b, c = x.shape[0], x.shape[-1]
    a1 = self.param('a1', nn.initializers.constant(0.5), (c,))
    windows = window_partition(x, self.window_size)
    global_tokens = pool_global_tokens(x, self.window_size, a1)
    repeated = jnp.repeat(global_tokens, windows.shape[0] // b, axis=0)
    return TokenNorm('layer', name='norm')(jnp.concatenate([windows, repeated], axis=1))


class SelfAttention(nn.Module):
  """Window attention with pooled global tokens and binarized q/k/v (`attention.attention`)."""
  spec: BlockSpec
  num_heads: int
  calibrate: bool = False

  @nn.compact
  def __call__(self, x, train):
    """`[B, H, W, C]` -> `[B, H, W, C]` (before the output projection)."""
    s = self.spec
    b, h, wd, c = x.shape
    w = s.window_size
    tokens = TokenFA(w, name='token_FA')(x)
    mixed = [self._qkv(tokens, p, train) for p in ('q', 'k', 'v')]
    q, k, v = (self._signed(m, p) for m, p in zip(mixed, ('q', 'k', 'v')))
    context = self._attend(q, k, v, train)
    context = norm_residual_act(self, context, mixed[0] + mixed[1] + mixed[2], train,
                                suffix='_context')

    n_win = context.shape[0] // b
    g = h // w
    local = window_merge(context[:, :w * w], w, b, h, wd)
    glob = jnp.mean(context[:, w * w:].reshape(b, n_win, g, wd // w, c), axis=1)
    glob = jnp.repeat(jnp.repeat(glob, w, axis=1), w, axis=2)
    parm = self.param('parm', nn.initializers.constant(0.5), (c,)).astype(x.dtype)
    return local * parm + glob * (1.0 - parm)

  def _qkv(self, t, p, train):
    names = {'q': 'query', 'k': 'key', 'v': 'value'}
    move = self.param(f'move{p}', nn.initializers.zeros, (t.shape[-1],)).astype(t.dtype)
    y = _dense(self.spec, t.shape[-1], names[p])(t + move)
    return norm_residual_act(self, y, t, train, suffix=p)

  def _signed(self, mixed, p):
    move = self.param(f'move{p}2', nn.initializers.zeros, (mixed.shape[-1],))
    return quantizers.maybe_sign(mixed + move.astype(mixed.dtype), self.spec.input_bits)

  def _attend(self, q, k, v, train):
    n, t, c = q.shape
    heads = self.num_heads
    d = c // heads
    split = lambda a: a.reshape(n, t, heads, d).transpose(0, 2, 1, 3)
    scores = jnp.einsum('nhqd,nhkd->nhqk', split(q), split(k)) / np.sqrt(d).astype(q.dtype)
    probs = jax.nn.softmax(scores, axis=-1)
    self.sow('intermediates', 'attention_probs', probs)
    probs = self._quantize(probs, train)
    context = jnp.einsum('nhqk,nhkd->nhqd', probs, split(v))
    return context.transpose(0, 2, 1, 3).reshape(n, t, c)

  def _quantize(self, probs, train):
    if self.spec.input_bits != 1:
      return probs
    return ATTENTION_QUANTIZERS[attention_quantizer(self.spec)].apply(self, probs, train)


@dataclasses.dataclass(frozen=True)
class AttentionQuantizer:
  """One way to binarize the attention matrix: its forward pass, op count and plotted parts."""
  bitplanes: int  # 0/1 maps that P·V decomposes into (ops_count)
  # (SelfAttention module, P `[N, heads, Nq, Nk]`, train) -> quantized P, declaring its params.
  apply: Callable
  # (P `[Nq, Nk]` of one head, the SelfAttention module's params, head) ->
  # ([(title, map `[Nq, Nk]`)], quantized P `[Nq, Nk]`), for tools/plot_attention.py.
  maps: Callable


_GSB_PARAMS = (('att_prob_clip', 0.005), ('att_prob_clip2', 1.0), ('att_prob_clip3', 1.0))


def _gsb_apply(module, probs, train):
  del train
  alphas = [module.param(name, nn.initializers.constant(init), ()) for name, init in _GSB_PARAMS]
  return quantizers.gsb_quantize(probs, *alphas)


def _gsb_maps(probs, params, head):
  del head
  alphas = [jnp.asarray(params[name]) for name, _ in _GSB_PARAMS]
  parts = quantizers.gsb_maps(jnp.asarray(probs), alphas[0])
  quantized = np.asarray(quantizers.gsb_quantize(jnp.asarray(probs), *alphas))
  a = np.maximum(np.asarray(alphas), quantizers.ALPHA_FLOOR)
  titles = ('T0 = round(P/α) − T1', 'T1 (q > 0.7·max)', 'T2 (q > 0.9·max)',
            f'α(T0+α2T1+α3T2)\nα={a[0]:.3g} α2={a[1]:.3g} α3={a[2]:.3g}')
  return list(zip(titles, [np.asarray(t) for t in parts] + [quantized])), quantized


def _lsq_apply(module, probs, train):
  return LSQAttentionQuantizer(module.num_heads, module.calibrate,
                               name='att_prob_quantizer')(3 * probs, train)


def _lsq_maps(probs, params, head):
  quant = params['att_prob_quantizer']
  alpha, zero = (float(np.asarray(quant[k])[head]) for k in ('alpha', 'zero_point'))
  levels = np.clip(np.round(3 * np.asarray(probs) / alpha + zero), 0, quantizers.LSQ_LEVELS)
  return [(f'LSQ level (α={alpha:.3g}, z={zero:.3g})', levels)], levels * alpha


# A new attention quantizer is its math in quantizers.py plus one entry here.
ATTENTION_QUANTIZERS = {'gsb': AttentionQuantizer(3, _gsb_apply, _gsb_maps),
                        'lsq': AttentionQuantizer(2, _lsq_apply, _lsq_maps)}


def attention_quantizer(spec) -> str:
  """The ATTENTION_QUANTIZERS key of a BlockSpec or BHViT."""
  return 'gsb' if spec.gsb else 'lsq'


class LSQAttentionQuantizer(nn.Module):
  """The non-gsb 3-level LSQ quantizer with its first-batch calibration.

  Calibration is explicit: `model.apply(..., train=True, mutable=[...,'params','quant_state'])`
  with `calibrate=True` in `BHViT` sets α, z from the batch (see `calibrate`).
  """
  heads: int
  calibrate: bool = False

  @nn.compact
  def __call__(self, x, train):
    """`x = 3·P`, `[N, heads, Nq, Nk]`."""
    alpha = self.param('alpha', nn.initializers.ones, (self.heads,))
    zero_point = self.param('zero_point', nn.initializers.zeros, (self.heads,))
    init_state = self.variable('quant_state', 'init_state', jnp.zeros, (1,), jnp.float32)
    if train and self.calibrate and not self.is_initializing():
      # Only quantizers that were never calibrated take the batch's values, as in the reference.
      fresh = init_state.value[0] == 0
      new_alpha, new_zero = quantizers.lsq_calibrate(x, zero_point)
      # The reference overwrites the parameters' values: gradients still reach them.
      alpha = jnp.where(fresh, alpha + jax.lax.stop_gradient(new_alpha - alpha), alpha)
      zero_point = jnp.where(fresh, zero_point + jax.lax.stop_gradient(new_zero - zero_point),
                             zero_point)
      self.sow('calibration', 'alpha', alpha)
      self.sow('calibration', 'zero_point', zero_point)
      init_state.value = jnp.ones_like(init_state.value)
    return quantizers.lsq_quantize(x, alpha, zero_point)


class Block(nn.Module):
  """One BHViT block: token mixer (conv-like or attention), binary MLP, shift residuals."""
  spec: BlockSpec
  kind: str  # 'conv' (stages 1-2) or 'attention' (stages 3-4)
  num_heads: int
  mlp_size: int
  drop_path: float = 0.0
  calibrate: bool = False

  @nn.compact
  def __call__(self, h, train):
    """`[B, H, W, C]` -> `[B, H, W, C]`."""
    s = self.spec
    c = h.shape[-1]
    n1 = TokenNorm(s.norm, name='layernorm_before')(h, train)
    h = self._mixer(n1, train) + h
    n2 = TokenNorm(s.norm, name='layernorm_after')(h, train)
    u = Projection(s, self.mlp_size, name='intermediate')(n2, train)
    out = Projection(s, c, layerscale=s.layerscale, name='output')(u, train)
    out = layers.drop_path(out, self.drop_path, not train, self) + h
    scales = {(kind, reach): layers.ShiftScale(name=f'layerscale_{kind}{2 * reach + 1}')(n2)
              for reach, flag in ((1, s.shift3), (2, s.shift5)) if flag
              for kind in ('h', 'w', 'ch')}
    return out + layers.shift_residuals(n2, scales, s.fast) if scales else out

  def _mixer(self, n1, train):
    if self.kind == 'conv':
      return TokenMixer(self.spec, name='GC')(n1, train)
    return AttentionUnit(self.spec, self.num_heads, self.calibrate, name='attention')(n1, train)


class AttentionUnit(nn.Module):
  """Self-attention followed by its output projection (`attention.attention`/`.output`)."""
  spec: BlockSpec
  num_heads: int
  calibrate: bool = False

  @nn.compact
  def __call__(self, x, train):
    """`[B, H, W, C]` -> `[B, H, W, C]`."""
    y = SelfAttention(self.spec, self.num_heads, self.calibrate, name='attention')(x, train)
    return Projection(self.spec, x.shape[-1], layerscale=self.spec.layerscale,
                      name='output')(y, train)


class Downsample(nn.Module):
  """Stage transition `C -> 2C`, `H -> H/2` (the reference's `patch_embedK`).

  Binary: `RPReLU(norm(binary conv 2x2/2 (norm0(h) + move)) + avgpool2x2(norm0(h)) tiled) + pos`
  (the tiled sum in a `[..., k, C]` view on the fast path, `fastpath.ChannelLayout`).
  Full precision (`some_fp`): `norm(conv 2x2/2 (norm0(h))) + pos`.
  """
  spec: BlockSpec
  features: int
  full_precision: bool

  @nn.compact
  def __call__(self, h, train):
    """`[B, H, W, C]` -> `[B, H/2, W/2, features]`."""
    s = self.spec
    b, hh, ww, c = h.shape
    n = TokenNorm(s.norm, name='norm0')(h, train)
    pos = self.param('position_embeddings', nn.initializers.truncated_normal(0.02),
                     (1, hh // 2, ww // 2, self.features))
    bits = 32 if self.full_precision else None
    conv = BinaryConv(self.features, 2, stride=2, use_bias=False,
                      weight_bits=bits or s.weight_bits, input_bits=bits or s.input_bits,
                      dtype=s.dtype, name='proj')
    if self.full_precision:
      return TokenNorm(s.norm, name='norm')(conv(n), train) + pos.astype(n.dtype)
    move = self.param('move', nn.initializers.zeros, (c,)).astype(n.dtype)
    shortcut = nn.avg_pool(n, (2, 2), strides=(2, 2))
    layout = fastpath.ChannelLayout.of(c, self.features, s.fast)
    y = norm_residual_act(self, layout.output(conv(n + move)), layout.shortcut(shortcut, train),
                          train, channel_axes=layout.out_axes)
    return layout.flat(y + layout.output(pos).astype(y.dtype))


class Embeddings(nn.Module):
  """Full-precision stem: conv patch_size x patch_size (stride = patch), norm, GELU, + pos."""
  spec: BlockSpec
  features: int
  patch_size: int

  @nn.compact
  def __call__(self, images, train):
    """`[B, H, W, 3]` -> `[B, H/p, W/p, features]`."""
    p = self.patch_size
    x = PatchEmbeddings(self.spec, self.features, p, name='patch_embeddings')(images, train)
    pos = self.param('position_embeddings', nn.initializers.truncated_normal(0.02),
                     (1,) + x.shape[1:])
    return x + pos.astype(x.dtype)


class PatchEmbeddings(nn.Module):
  spec: BlockSpec
  features: int
  patch_size: int

  @nn.compact
  def __call__(self, images, train):
    x = BinaryConv(self.features, self.patch_size, stride=self.patch_size, weight_bits=32,
                   input_bits=32, dtype=self.spec.dtype, name='proj')(images)
    x = TokenNorm(self.spec.norm, name='norm')(x, train)
    return nn.gelu(x, approximate=False)


# Model sizes by name: a new size is one line here (configs, tools and benchmarks read it).
VARIANTS = {
    'demo': dict(hidden_sizes=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
                 mlp_sizes=(128, 256, 256, 512)),
    'tiny': dict(hidden_sizes=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 1, 4, 8),
                 mlp_sizes=(512, 1024, 1024, 2048)),
    'small': dict(hidden_sizes=(64, 128, 256, 512), depths=(3, 4, 8, 4), num_heads=(1, 1, 4, 8),
                  mlp_sizes=(512, 1024, 1024, 2048)),
}


# Modules whose `kernel` is a 1-bit latent weight when weight_bits == 1: the token mixers' convs
# and every linear layer of the blocks. With some_fp off, the downsampling `proj` is binarized
# too; the oscillation regularizer covers BINARY_MODULES only (docs/reference.md, "Losses").
BINARY_MODULES = ('cov1', 'cov2', 'cov3', 'dense', 'query', 'key', 'value')
# The binary linear layers, the only ones ReCU normalizes (as the reference).
RECU_MODULES = ('dense', 'query', 'key', 'value')


def path_names(path) -> tuple:
  """Key names of a pytree path (dict keys or attribute names), or a tuple of names as is."""
  return tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path)


def is_binary_kernel(path, weight_bits: int = 1, some_fp: bool = True) -> bool:
  """Whether the param at `path` is binarized in the forward pass (defaults: the regularizer's
  set, which is the binarized set of a model with some_fp on)."""
  names = path_names(path)
  if weight_bits != 1 or len(names) < 2 or names[-1] != 'kernel':
    return False
  return names[-2] in BINARY_MODULES or (
      not some_fp and names[-2] == 'proj' and str(names[0]).startswith('patch_embed'))


def binary_kernel_mask(params, model=None):
  """Bool pytree of `is_binary_kernel` over params (`model` None: the regularizer's set)."""
  flags_ = {} if model is None else dict(weight_bits=model.weight_bits, some_fp=model.some_fp)
  return jax.tree_util.tree_map_with_path(lambda p, _: is_binary_kernel(p, **flags_), params)


def variant(name: str) -> dict:
  """The size fields of a named variant (a copy; see VARIANTS)."""
  if name not in VARIANTS:
    raise config_lib.UserError(f'unknown model variant ({name}); known: '
                               f'{", ".join(sorted(VARIANTS))}')
  return dict(VARIANTS[name])


def _split_groups_setting(value):
  """True, False or 'auto' from a config value (a --config override arrives as a string)."""
  if isinstance(value, str):
    if value.lower() in ('auto', 'true', 'false'):
      return {'auto': 'auto', 'true': True, 'false': False}[value.lower()]
    raise config_lib.UserError(f"split_groups={value!r} must be True, False or 'auto'")
  return bool(value)


def resolve_split_groups(value, fast_paths: str = 'auto') -> bool:
  """`split_groups` as used: 'auto' follows the fast paths (`fastpath.enabled`: per group on
  CPU, grouped elsewhere unless `fast_paths` says otherwise); True/False are kept."""
  setting = _split_groups_setting(value)
  return fastpath.enabled(fast_paths) if setting == 'auto' else setting


class BHViT(nn.Module):
  """The Binarized Hybrid Vision Transformer (defaults: BHViT-tiny, published flags)."""
  hidden_sizes: Sequence[int] = VARIANTS['tiny']['hidden_sizes']
  depths: Sequence[int] = VARIANTS['tiny']['depths']
  num_heads: Sequence[int] = VARIANTS['tiny']['num_heads']
  mlp_sizes: Sequence[int] = VARIANTS['tiny']['mlp_sizes']
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 4
  window_size: int = 7
  weight_bits: int = 1
  input_bits: int = 1
  norm: str = 'batch'
  shift3: bool = True
  shift5: bool = True
  some_fp: bool = True
  gsb: bool = False
  recu: bool = False
  disable_layerscale: bool = False
  drop_path: float = 0.0
  # 'auto' (fast layouts on the backends they help), 'plain' or 'cpu' (`fastpath`).
  fast_paths: str = 'auto'
  split_groups: Any = 'auto'  # True, False or 'auto' (resolve_split_groups)
  remat_stages: Sequence[int] = ()  # stages (1-4) recomputed in the backward pass: less memory
  dtype: Any = None

  def spec(self) -> BlockSpec:
    return BlockSpec(self.weight_bits, self.input_bits, self.norm, self.recu, self.gsb,
                     self.shift3, self.shift5, not self.disable_layerscale, self.window_size,
                     fastpath.enabled(self.fast_paths),
                     resolve_split_groups(self.split_groups, self.fast_paths), self.dtype)

  @nn.compact
  def __call__(self, images, train: bool = False, calibrate: bool = False,
               features: bool = False):
    """`[B, H, W, 3]` images -> `[B, num_classes]` logits, or with `features` the stage maps.

    With `features=True` the head (final norm, pooling, classifier) is neither applied nor
    created: the result is `[B, H/4, W/4, C1], ..., [B, H/32, W/32, C4]` for patch size 4,
    each stage's last block output before its downsampling.
    """
    validate(self)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f'expected images [B, {self.image_size}, {self.image_size}, 3] (NHWC), '
                       f'got shape {tuple(images.shape)}')
    spec = self.spec()
    if self.dtype is not None:
      images = images.astype(self.dtype)
    h = Embeddings(spec, self.hidden_sizes[0], self.patch_size, name='embeddings')(images, train)
    rates = np.linspace(0, self.drop_path, sum(self.depths))
    n_conv = self.depths[0] + self.depths[1]
    i = 0
    recomputed = remat_lib.remat(Block, static_argnums=(2,))
    stage_maps = []
    for stage, depth in enumerate(self.depths):
      block_cls = recomputed if stage + 1 in self.remat_stages else Block
      for _ in range(depth):
        kind = 'conv' if stage < 2 else 'attention'
        name = f'layerA_{i}' if i < n_conv else f'layerB_{i - n_conv}'
        h = block_cls(spec, kind, self.num_heads[stage], self.mlp_sizes[stage],
                      float(rates[i]), calibrate, name=name)(h, train)
        i += 1
      stage_maps.append(h)
      if stage < 3:
        h = Downsample(spec, self.hidden_sizes[stage + 1], self.some_fp,
                       name=f'patch_embed{stage + 1}')(h, train)
    if features:
      return stage_maps
    h = TokenNorm(self.norm, name='layernorm')(h, train)
    pooled = jnp.mean(h.reshape(h.shape[0], -1, h.shape[-1]), axis=1)
    return BinaryDense(self.num_classes, 32, 32, use_bias=True, name='classifier')(pooled)

  def features(self, images, train: bool = False, calibrate: bool = False):
    """The backbone: `apply(..., method='features')` -> the four stage maps (see `__call__`)."""
    return self(images, train, calibrate, features=True)


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(BHViT) if f.name not in ('parent', 'name'))


def validate(m: BHViT):
  """Raises ValueError naming every inconsistency of a BHViT configuration."""
  errors = []
  sizes = (m.hidden_sizes, m.depths, m.num_heads, m.mlp_sizes)
  if any(len(v) != 4 for v in sizes):
    errors.append('hidden_sizes, depths, num_heads and mlp_sizes need 4 entries each (stages), '
                  f'got {[len(v) for v in sizes]}')
  else:
    for st in range(4):
      c = m.hidden_sizes[st]
      if st and c != 2 * m.hidden_sizes[st - 1]:
        errors.append(f'hidden_sizes[{st}]={c} must be twice hidden_sizes[{st - 1}] '
                      '(downsampling doubles the width)')
      if m.mlp_sizes[st] % c:
        errors.append(f'mlp_sizes[{st}]={m.mlp_sizes[st]} is not an integer multiple of '
                      f'hidden_sizes[{st}]={c} (MLP ratio must be an integer)')
      if c % 4:
        errors.append(f'hidden_sizes[{st}]={c} must be divisible by 4 (grouped convs, shifts)')
      if st >= 2 and c % m.num_heads[st]:
        errors.append(f'num_heads[{st}]={m.num_heads[st]} does not divide hidden_sizes[{st}]={c}')
      if m.depths[st] < 1:
        errors.append(f'depths[{st}] must be >= 1')
  w = m.window_size
  if w < 1 or w % 2 == 0:
    errors.append(f'window_size={w} must be odd (global-token pooling pads window_size//2)')
  stride = m.patch_size * 8
  if m.image_size % stride:
    errors.append(f'image_size={m.image_size} must be divisible by patch_size*8={stride}')
  elif w % 2 and any((m.image_size // (m.patch_size * f)) % w for f in (4, 8)):
    errors.append(f'image_size={m.image_size}: the stage-3/4 grids '
                  f'{m.image_size // (m.patch_size * 4)} and {m.image_size // (m.patch_size * 8)}'
                  f' must be divisible by window_size={w}')
  for check, value in ((_split_groups_setting, m.split_groups), (fastpath.check, m.fast_paths)):
    try:
      check(value)
    except ValueError as e:
      errors.append(str(e))
  if not set(m.remat_stages) <= {1, 2, 3, 4}:
    errors.append(f'remat_stages={tuple(m.remat_stages)} must hold stage numbers 1-4')
  for name, value, allowed in (('weight_bits', m.weight_bits, (1, 32)),
                               ('input_bits', m.input_bits, (1, 32)),
                               ('norm', m.norm, ('batch', 'layer'))):
    if value not in allowed:
      errors.append(f'{name}={value!r} must be one of {allowed}')
  config_lib.raise_problems('invalid BHViT configuration', errors)


def from_config(cfg) -> BHViT:
  """Builds `BHViT` from a mapping (e.g. `config.model`); unknown keys are an error."""
  cfg = dict(cfg)
  unknown = sorted(set(cfg) - set(MODEL_FIELDS))
  if unknown:
    import difflib
    hints = [f'{k} (did you mean {difflib.get_close_matches(k, MODEL_FIELDS, 1)[0]}?)'
             if difflib.get_close_matches(k, MODEL_FIELDS, 1) else k for k in unknown]
    raise config_lib.ConfigError(f'unknown model config keys ({", ".join(hints)})')
  for key in ('hidden_sizes', 'depths', 'num_heads', 'mlp_sizes', 'remat_stages'):
    if key in cfg:
      cfg[key] = tuple(cfg[key])
  if isinstance(cfg.get('dtype'), str):
    cfg['dtype'] = jnp.dtype(cfg['dtype'])
  model = BHViT(**cfg)
  validate(model)
  return model


def build(model_config, compute_dtype: str = 'float32') -> BHViT:
  """BHViT with float32 params and `compute_dtype` activations from `config.model`."""
  fields = dict(model_config)
  if compute_dtype != 'float32':
    fields['dtype'] = compute_dtype
  return from_config(fields)


def init_variables(model: BHViT, rng) -> dict:
  """Fresh variables of `model` (jitted init on one image)."""
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  return flax.core.unfreeze(jax.jit(functools.partial(model.init, train=False))(
      {'params': rng}, images))


def calibrate(model: BHViT, variables, images):
  """The non-gsb attention quantizer's first-batch calibration as an explicit, pure step.

  Runs one train-mode forward in which every uncalibrated quantizer sets α and z from its
  input (docs/reference.md §2) and uses them. Returns `(variables, logits)`: params with the calibrated α,
  z and `quant_state` flags set; batch statistics are left as they were (the first train
  step updates them, as the reference's first forward does once).
  """
  if not variables.get('quant_state'):
    return variables, None
  logits, updates = model.apply(variables, images, train=True, calibrate=True,
                                mutable=['batch_stats', 'quant_state', 'calibration'])
  new = dict(variables)
  new['params'] = with_calibration(variables['params'], updates['calibration'])
  new['quant_state'] = updates['quant_state']
  return new, logits


def with_calibration(params, calibration):
  """`params` with the α and z that a `calibrate=True` forward sowed into 'calibration'."""
  flat = flax.traverse_util.flatten_dict(params)
  for path, value in flax.traverse_util.flatten_dict(calibration).items():
    flat[path] = value[0] if isinstance(value, tuple) else value
  return flax.traverse_util.unflatten_dict(flat)


def is_calibrated(quant_state) -> bool:
  """Whether every non-gsb attention quantizer has taken its first-batch α and z (concrete)."""
  return all(bool(np.all(np.asarray(f))) for f in jax.tree_util.tree_leaves(quant_state))
