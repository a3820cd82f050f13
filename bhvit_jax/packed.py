"""Deployable bit-packed BHViT: export, file format and XNOR-popcount inference.

File (msgpack via `flax.serialization`), a dict:
- `format`: 'bhvit-packed-v1'; `model`: JSON of the BHViT fields.
- `binary/<module path>`: every binarized layer: `sign` uint32 `[O, ceil(K/32)]`, the bits
  (w > 0) of its binarized weight packed LSB-first along the fan-in axis K (dense: `in`; conv:
  the im2col order (kh, kw, c_in/groups)); `nonzero` (same shape) only when some centred weight
  is exactly 0 (sign(0) = 0, docs/reference.md §7); `scale`, `shift` `[O]`: the per-output affine applied to
  the integer dot product. `scale` is s_o = mean|W_o| of the raw latent weight, times the
  following eval-mode BatchNorm when one directly follows the layer (`FOLLOWING_NORM`); `shift`
  is the conv bias or that BatchNorm's shift.
- `norms/<module path>`: every other eval-mode BatchNorm as `scale`, `shift` (x·scale + shift);
  an empty dict marks a BatchNorm folded into the binary layer before it.
- `variables`: the remaining full-precision variables (float32 or float16), no batch_stats.

Inference runs the lead's `BHViT` unchanged, with `flax.linen.intercept_methods` replacing the
binary layers and the BatchNorms by their packed forms, so the network structure is never
duplicated here. Binary layers compute `Σ sign(x)·sign(w)` as XNOR-popcount over uint32 words
with a nonzero bit-plane for the activations, which handles sign(0) = 0 exactly, including the
zero padding of convs (padded positions carry nonzero = 0) and the unused tail bits of the last
word. A conv packs its input once (each kernel position's channels in words of their own; the
weights are regrouped to match) and sums the popcounts of the k·k shifted views of those words,
with no im2col buffer.
The attention products q·kᵀ and P·v have no weights and run as in the float model.
"""
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bhvit_jax import config_lib
from bhvit_jax import layers
from bhvit_jax import model as model_lib
from bhvit_jax import ops_count
from bhvit_jax import quantizers

FORMAT = 'bhvit-packed-v1'
WORD_BITS = 32
# A binary layer whose eval-mode BatchNorm (a sibling module) takes its output directly.
FOLLOWING_NORM = {'dense': 'norm', 'query': 'normq', 'key': 'normk', 'value': 'normv',
                  'proj': 'norm'}


def pack_bits(bits):
  """bool `[..., K]` -> uint32 `[..., ceil(K/32)]`; element 32·i + j is bit j of word i."""
  return _pack(bits)[0]


def pack_signs(x):
  """`[..., K]` -> the words of x > 0 and of x != 0, `pack_bits`' layout, read in one pass."""
  return _pack(x > 0, x != 0)


def _pack(*bits):
  k = bits[0].shape[-1]
  words = -(-k // WORD_BITS)
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)

  def split(b):
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, words * WORD_BITS - k)])
    return b.reshape(b.shape[:-1] + (words, WORD_BITS)).astype(jnp.uint32) << shifts

  # One variadic reduction: XLA reads the values once for all planes, where one reduction
  # per plane reads them once each.
  return jax.lax.reduce(tuple(split(b) for b in bits), (np.uint32(0),) * len(bits),
                        lambda a, b: tuple(u | v for u, v in zip(a, b)), (bits[0].ndim,))


def unpack_bits(words, k: int):
  """Inverse of `pack_bits`: uint32 `[..., W]` -> bool `[..., k]`."""
  # A numpy constant: ONNX has no uint32 Range.
  bits = (words[..., None] >> np.arange(WORD_BITS, dtype=np.uint32)) & 1
  return bits.reshape(words.shape[:-1] + (-1,))[..., :k].astype(bool)


def xnor_popcount_dot(a_sign, a_nonzero, w_sign, w_nonzero=None):
  """`Σ_k sign(a)·sign(w)` for signs in {-1, 0, 1} given as bit-planes.

  Args:
    a_sign, a_nonzero: uint32 `[..., G, W]`: bits of a > 0 and a != 0.
    w_sign: uint32 `[G, O, W]`; w_nonzero: same or None (every weight sign is ±1).
  Returns:
    int32 `[..., G, O]`: (#agreeing − #disagreeing) over positions where both are nonzero.
  """
  return xnor_popcount_taps([(a_sign, a_nonzero)], w_sign, w_nonzero)


def xnor_popcount_taps(taps, w_sign, w_nonzero=None):
  """`xnor_popcount_dot` of a fan-in split into taps (a conv's kernel positions).

  Args:
    taps: `[(a_sign, a_nonzero)]`, uint32 `[..., G, W]` each; tap t meets the weight words
      `t·W .. (t+1)·W − 1`.
    w_sign: uint32 `[G, O, len(taps)·W]`; w_nonzero: same or None.
  Returns:
    int32 `[..., G, O]`.
  """
  # The taps' popcounts are added before the one reduction over words: compilers then read
  # each tap's (shifted) activations in place, where an im2col buffer costs one copy per tap
  # (IREE: one dispatch per tap and plane).
  words = taps[0][0].shape[-1]
  active = differ = 0
  for t, (a_sign, a_nonzero) in enumerate(taps):
    tap = slice(t * words, (t + 1) * words)
    both = a_nonzero[..., None, :]
    if w_nonzero is not None:
      both = both & w_nonzero[..., tap]
    active = active + jax.lax.population_count(both).astype(jnp.int32)
    differ = differ + jax.lax.population_count(
        both & (a_sign[..., None, :] ^ w_sign[..., tap])).astype(jnp.int32)
  return jnp.sum(active, axis=-1) - 2 * jnp.sum(differ, axis=-1)


def conv_taps(x, k: int, stride: int, dilation: int, padding: int):
  """`[B, H, W, ...]` -> the k·k inputs `[B, H', W', ...]` of a conv's kernel positions, in the
  HWIO kernel's (kh, kw) order: strided slices of x zero-padded (False for bool inputs), whose
  sign is 0 as in the float model."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding)) + ((0, 0),) * (x.ndim - 3))
  out_h = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  out_w = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  return [xp[:, i * dilation:i * dilation + stride * (out_h - 1) + 1:stride,
             j * dilation:j * dilation + stride * (out_w - 1) + 1:stride]
          for i in range(k) for j in range(k)]


def _binary_layer(module, x, entry, products: str):
  """Packed replacement of a BinaryDense / BinaryConv call; `x` is its (unsigned) input."""
  conv = isinstance(module, layers.BinaryConv)
  groups = module.groups if conv else 1
  # [..., groups, fan-in per group (conv: per tap)]
  x = x.reshape(x.shape[:x.ndim - (1 if conv else module.channel_axes)] + (groups, -1))
  if module.input_bits == 1 and products == 'popcount':
    taps = module.kernel_size ** 2 if conv else 1
    w_sign, w_nonzero = (_tap_words(entry.get(k), taps, x.shape[-1], groups)
                         for k in ('sign', 'nonzero'))
    # Packing before the taps are taken shifts words, not floats, and zero padding gives
    # words whose nonzero bits are all 0, which contribute nothing.
    planes = pack_signs(x)
    taps = (list(zip(*(conv_taps(p, module.kernel_size, module.stride, module.dilation,
                                 module.padding) for p in planes)))
            if conv else [planes])
    dot = xnor_popcount_taps(taps, w_sign, w_nonzero)
    dot = dot.reshape(dot.shape[:-2] + (-1,))
    module.sow('intermediates', 'popcount', dot)
  else:
    dot = _float_products(module, jnp.sign(x) if module.input_bits == 1 else x, entry)
  dot = dot.astype(jnp.float32)
  return dot * entry['scale'].astype(jnp.float32) + entry['shift'].astype(jnp.float32)


def _float_products(module, x, entry):
  """`x · sign(W)` `[..., O]` for x `[..., groups, K/groups]`: a grouped convolution or a
  matmul with the weight signs unpacked to float, which runtimes run with their own kernels.
  Full precision: accelerators' default float32 products round the operands."""
  highest = jax.lax.Precision.HIGHEST
  if not isinstance(module, layers.BinaryConv):
    return jnp.matmul(x[..., 0, :], _signs(entry, 1, x.shape[-1])[0].T.astype(x.dtype),
                      precision=highest)
  k, groups, channels = module.kernel_size, module.groups, x.shape[-1]
  signs = _signs(entry, groups, k * k * channels).reshape(groups, -1, k, k, channels)
  kernel = signs.transpose(2, 3, 4, 0, 1).reshape(k, k, channels, -1).astype(x.dtype)
  pad = [(module.padding, module.padding)] * 2
  return jax.lax.conv_general_dilated(
      x.reshape(x.shape[:3] + (-1,)), kernel, (module.stride,) * 2, pad,
      rhs_dilation=(module.dilation,) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision=highest)


def _signs(entry, groups: int, fan_in: int):
  """An entry's weight signs (±1, or 0 where its nonzero bit is clear) `[groups, O/groups, K]`."""
  unpack = lambda k: unpack_bits(entry[k].reshape(groups, -1, entry[k].shape[-1]), fan_in)
  signs = jnp.where(unpack('sign'), 1, -1)
  return signs * unpack('nonzero') if 'nonzero' in entry else signs


def _tap_words(words, taps: int, fan_in: int, groups: int):
  """`[O, ceil(taps·fan_in/32)]` words -> `[groups, O/groups, taps·ceil(fan_in/32)]`.

  The file packs a conv's (kh, kw, c) fan-in contiguously; inference packs each tap's
  channels into words of their own, so the taps of packed activations line up with it.
  """
  if words is None:
    return None
  if taps > 1 and fan_in % WORD_BITS:
    bits = unpack_bits(words, taps * fan_in).reshape(words.shape[0], taps, fan_in)
    words = pack_bits(bits).reshape(words.shape[0], -1)
  return words.reshape(groups, -1, words.shape[-1])


def _interceptor(packed, products: str):
  binary, norms = packed['binary'], packed['norms']

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    key = '/'.join(module.path)
    if context.method_name == '__call__':
      if isinstance(module, (layers.BinaryDense, layers.BinaryConv)) and key in binary:
        return _binary_layer(module, args[0], binary[key], products)
      if isinstance(module, layers.TokenNorm) and key in norms:
        entry, x = norms[key], args[0]
        if not entry:
          return x
        shape = x.shape[x.ndim - module.channel_axes:]
        affine = [entry[k].reshape(shape).astype(x.dtype) for k in ('scale', 'shift')]
        return x * affine[0] + affine[1]
    return next_fun(*args, **kwargs)

  return intercept


PRODUCTS = ('popcount', 'float')


def apply(model: model_lib.BHViT, packed, images, products: str = 'popcount',
          popcounts: bool = False):
  """Eval-mode logits `[B, classes]` of the packed model; `packed` is `load`'s `arrays`.

  `products`: how binary layers multiply signs: 'popcount' (XNOR-popcount on uint32 words) or
  'float' (float32 ±1/0 operands unpacked from the same words, for runtimes without a
  popcount, e.g. ONNX). Both sum integers exactly (float32 holds sums below 2**24).
  `popcounts` (with 'popcount'): returns (logits, {module path: int32 `[N, ..., O]`}), the
  XNOR-popcount sums of every binary layer with 1-bit inputs (N: the images, times the windows
  in attention), the integer part that another compiler of this function must reproduce
  exactly.
  """
  if products not in PRODUCTS:
    raise config_lib.UserError(f'unknown products {products!r}; expected one of {PRODUCTS}')
  variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32)
                           if jnp.issubdtype(v.dtype, jnp.floating) else v,
                           packed['variables'])
  with nn.intercept_methods(_interceptor(packed, products)):
    if not popcounts:
      return model.apply(variables, images, train=False)
    logits, state = model.apply(variables, images, train=False, mutable='intermediates')
  sums = flax.traverse_util.flatten_dict(state['intermediates'])
  return logits, {'/'.join(path[:-1]): value[0] for path, value in sums.items()
                  if path[-1] == 'popcount'}


def _fold_norm(params, stats):
  """Eval BatchNorm -> (scale, shift) in float64."""
  a = np.asarray(params['scale'], np.float64) / np.sqrt(np.asarray(stats['var'], np.float64)
                                                        + layers.EPS)
  return a, np.asarray(params['bias'], np.float64) - np.asarray(stats['mean'], np.float64) * a


_binarize = jax.jit(quantizers.binarize_weight, static_argnums=1)


def _pack_kernel(kernel, recu: bool):
  """Latent kernel `[..., O]` -> (sign words, nonzero words or None, s_o float64 `[O]`)."""
  # The model's own binarization decides every sign, so float rounding cannot flip one here.
  binarized = np.asarray(_binarize(jnp.asarray(kernel), recu))
  flat = binarized.reshape(-1, binarized.shape[-1]).T
  scale = np.mean(np.abs(np.asarray(kernel, np.float64)).reshape(flat.T.shape), axis=0)
  nonzero = None if np.all(flat != 0) else np.asarray(pack_bits(jnp.asarray(flat != 0)))
  return np.asarray(pack_bits(jnp.asarray(flat > 0))), nonzero, scale


def export(model: model_lib.BHViT, variables, fp_dtype=np.float32) -> dict:
  """Flax variables of `model` -> the packed tree described in the module docstring."""
  params = flax.traverse_util.flatten_dict(variables['params'])
  stats = flax.traverse_util.flatten_dict(variables.get('batch_stats', {}))
  norm_paths = {p[:-1] for p in stats if p[-1] == 'mean'}
  binary, norms, used = {}, {}, set()
  for path in [p for p in params if model_lib.is_binary_kernel(p, model.weight_bits,
                                                                model.some_fp)]:
    module = path[:-1]
    sign, nonzero, scale = _pack_kernel(params[path],
                                        model.recu and module[-1] in model_lib.RECU_MODULES)
    shift = np.asarray(params.get(module + ('bias',), np.zeros_like(scale)), np.float64)
    norm = module[:-1] + (FOLLOWING_NORM.get(module[-1], ''),)
    if norm in norm_paths:
      a, b = _fold_norm(_group(params, norm), _group(stats, norm))
      scale, shift = scale * a, shift * a + b
      norms['/'.join(norm)] = {}
      used.add(norm)
    entry = {'sign': sign, 'scale': scale.astype(np.float32), 'shift': shift.astype(np.float32)}
    if nonzero is not None:
      entry['nonzero'] = nonzero
    binary['/'.join(module)] = entry
    used.update({path, module + ('bias',)})
  for norm in norm_paths - used:
    a, b = _fold_norm(_group(params, norm), _group(stats, norm))
    norms['/'.join(norm)] = {'scale': a.astype(fp_dtype), 'shift': b.astype(fp_dtype)}
    used.add(norm)
  rest = {p: _cast(v, fp_dtype) for p, v in params.items()
          if p not in used and p[:-1] not in used}
  out_vars = {'params': flax.traverse_util.unflatten_dict(rest)}
  if variables.get('quant_state'):
    out_vars['quant_state'] = jax.tree.map(np.asarray, variables['quant_state'])
  return {'format': FORMAT, 'model': json.dumps(_model_fields(model)), 'binary': binary,
          'norms': norms, 'variables': out_vars}


def _group(flat, prefix):
  return {p[-1]: v for p, v in flat.items() if p[:-1] == prefix}


def _cast(value, dtype):
  value = np.asarray(value)
  return value.astype(dtype) if np.issubdtype(value.dtype, np.floating) else value


def _model_fields(model):
  fields = {f: getattr(model, f) for f in model_lib.MODEL_FIELDS}
  fields['dtype'] = None if fields['dtype'] is None else jnp.dtype(fields['dtype']).name
  return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def save(tree, path):
  """Writes an `export` tree; returns the file size in bytes."""
  data = flax.serialization.msgpack_serialize(tree)
  with open(path, 'wb') as f:
    f.write(data)
  return len(data)


def load(path):
  """Reads a packed file -> (BHViT, arrays for `apply`)."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    tree = flax.serialization.msgpack_restore(data)
  except Exception:  # pylint: disable=broad-except  (msgpack has several error types)
    tree = None
  if not isinstance(tree, dict) or tree.get('format') != FORMAT:
    raise config_lib.UserError(f'{path} is not a packed BHViT file (expected format '
                               f'{FORMAT!r})')
  model = model_lib.from_config(json.loads(tree['model']))
  return model, {k: tree[k] for k in ('binary', 'norms', 'variables')}


def arrays(tree):
  """The jit-able part of an `export` tree (drops the format and model strings)."""
  return {k: tree[k] for k in ('binary', 'norms', 'variables')}


def float_checkpoint_bytes(variables) -> int:
  """Size of the float32 params + batch statistics serialized the same way."""
  tree = {k: jax.tree.map(lambda v: _cast(v, np.float32), variables[k])
          for k in ('params', 'batch_stats', 'quant_state') if variables.get(k)}
  return len(flax.serialization.msgpack_serialize(tree))


def theoretical_bytes(model: model_lib.BHViT) -> float:
  """binarized params / 8 + full-precision params · 4 bytes."""
  counts = ops_count.count(model)
  return counts.params_binary / 8 + counts.params_fp * 4
