"""Parameter, BOP, FLOP and OP counts of a BHViT configuration at any resolution.

Conventions (those of the binary-network literature, e.g. Bi-Real Net, ReActNet, BiViT):
- Only multiply-accumulates (MACs) are counted; norms, activations, shifts, poolings, residual
  additions, softmax and the per-channel scalings of binary layers are not.
- BOPs are MACs whose two operands are both 1-bit: binary linears and convs with
  weight_bits = input_bits = 1, and the attention product q·kᵀ (both signs). With input_bits = 32
  the attention products are FLOPs.
- P·v (P quantized, v signs) is computed as bit-plane products: the gsb quantizer writes
  `(T0 + α2·T1 + α3·T2)·α = α·(b + (α2−1)·t1 + (α3−α2)·t2)` with three 0/1 maps b, t1, t2
  (see `quantizers._gsb_masks`), so each P·v MAC is 3 BOPs; the 3-level LSQ quantizer has levels
  0…3, i.e. 2 bit planes, so 2 BOPs. `pv='float'` counts P·v as FLOPs instead.
- FLOPs are all other MACs: stem, full-precision downsampling convs, the classifier, and any
  layer with weight_bits or input_bits 32.
- OPs = BOPs / 64 + FLOPs.

Counts come from the module calls of the model itself (intercepted during `jax.eval_shape`), so
every MAC is derived from actual shapes; the parameter counts come from the Flax param tree.
"""
import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bhvit_jax import layers
from bhvit_jax import model as model_lib

BOPS_PER_OP = 64


@dataclasses.dataclass
class OpRecord:
  """One MAC-carrying operation of the forward pass (batch 1)."""
  name: str          # module path, e.g. 'layerA_0/GC/cov1' or 'layerB_0/attention/attention/qk'
  op: str            # 'dense' | 'conv' | 'qk' | 'pv'
  shape: str         # human-readable input -> output shape
  params: int        # parameters of the kernel (0 for attention products)
  params_binary: int
  macs: int
  bops: int
  flops: int


def _mac_record(module, x, out) -> OpRecord:
  binary = module.weight_bits == 1 and module.input_bits == 1
  if isinstance(module, layers.BinaryDense):
    op, fan_in = 'dense', int(np.prod(x.shape[x.ndim - module.channel_axes:]))
  else:
    op, fan_in = 'conv', module.kernel_size ** 2 * (x.shape[-1] // module.groups)
  macs = int(np.prod(out.shape)) * fan_in
  kernel = fan_in * out.shape[-1]
  return OpRecord('/'.join(module.path), op,
                  f'{tuple(x.shape[1:])}->{tuple(out.shape[1:])}', kernel,
                  kernel if module.weight_bits == 1 else 0,
                  macs, macs if binary else 0, 0 if binary else macs)


def _attention_records(module, q, pv: str):
  """q·kᵀ and P·v of one SelfAttention; q `[B·nW, T, C]`."""
  n, t, c = q.shape
  macs = n * t * t * c
  spec = module.spec
  name = '/'.join(module.path)
  shape = f'{n}x{t}x{c}, heads={module.num_heads}'
  binary = spec.input_bits == 1
  planes = model_lib.ATTENTION_QUANTIZERS[model_lib.attention_quantizer(spec)].bitplanes
  pv_binary = binary and pv == 'bitplanes'
  return [OpRecord(name + '/qk', 'qk', shape, 0, 0, macs, macs if binary else 0,
                   0 if binary else macs),
          OpRecord(name + '/pv', 'pv', shape, 0, 0, macs, planes * macs if pv_binary else 0,
                   0 if pv_binary else macs)]


def collect(model: model_lib.BHViT, pv: str = 'bitplanes'):
  """Runs `model.init` abstractly; returns (param shapes {path: shape}, [OpRecord])."""
  if pv not in ('bitplanes', 'float'):
    raise ValueError(f"pv must be 'bitplanes' or 'float', got {pv!r}")
  records = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(
        module, (layers.BinaryDense, layers.BinaryConv)):
      records.append(_mac_record(module, args[0], out))
    elif context.method_name == '_attend':
      records.extend(_attention_records(module, args[0], pv))
    return out

  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  with nn.intercept_methods(interceptor):
    variables = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, images))
  shapes = {p: tuple(v.shape) for p, v in
            flax.traverse_util.flatten_dict(variables['params']).items()}
  return shapes, records


@dataclasses.dataclass
class Counts:
  params: int
  params_binary: int
  params_fp: int
  bops: int
  flops: int
  macs: int
  ops: float
  records: list
  modules: dict  # top-level module -> (params, binary params)

  def summary(self) -> dict:
    return {'params': self.params, 'params_binary': self.params_binary,
            'params_fp': self.params_fp, 'bops': self.bops, 'flops': self.flops,
            'macs': self.macs, 'ops': self.ops}


def count(model: model_lib.BHViT, pv: str = 'bitplanes') -> Counts:
  """All counts for one image of `model.image_size`² (batch 1)."""
  model_lib.validate(model)
  shapes, records = collect(model, pv)
  modules = {}
  total = binary = 0
  for path, shape in shapes.items():
    size = int(np.prod(shape))
    is_bin = model_lib.is_binary_kernel(path, model.weight_bits, model.some_fp)
    mod = modules.setdefault(path[0], [0, 0])
    mod[0] += size
    mod[1] += size if is_bin else 0
    total += size
    binary += size if is_bin else 0
  bops = sum(r.bops for r in records)
  flops = sum(r.flops for r in records)
  return Counts(total, binary, total - binary, bops, flops, sum(r.macs for r in records),
                bops / BOPS_PER_OP + flops, records,
                {k: tuple(v) for k, v in modules.items()})


def format_table(counts: Counts) -> str:
  """Per-operation MAC table, per-module parameter table and totals, as text."""
  lines = [f'{"operation":44s} {"op":5s} {"shape":34s} {"params":>10s} {"binary":>10s} '
           f'{"BOPs":>14s} {"FLOPs":>14s}']
  for r in counts.records:
    lines.append(f'{r.name:44s} {r.op:5s} {r.shape:34s} {r.params:10,d} {r.params_binary:10,d} '
                 f'{r.bops:14,d} {r.flops:14,d}')
  lines += ['', f'{"module":44s} {"params":>12s} {"binary":>12s} {"full precision":>15s}']
  for name, (p, b) in counts.modules.items():
    lines.append(f'{name:44s} {p:12,d} {b:12,d} {p - b:15,d}')
  c = counts
  lines += ['',
            f'params: {c.params:,d} total, {c.params_binary:,d} binarized '
            f'({c.params_binary / 1e6:.2f}M), {c.params_fp:,d} full precision',
            f'BOPs: {c.bops:,d} ({c.bops / 1e9:.3f}G)   FLOPs: {c.flops:,d} '
            f'({c.flops / 1e9:.3f}G)   MACs: {c.macs:,d}',
            f'OPs = BOPs/{BOPS_PER_OP} + FLOPs = {c.ops:,.0f} ({c.ops / 1e8:.3f}e8)']
  return '\n'.join(lines)

