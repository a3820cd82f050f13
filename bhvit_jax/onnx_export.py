"""A JAX function -> an ONNX model, by lowering its jaxpr one primitive at a time.

`to_onnx(fn, inputs, constants)` traces `fn(*inputs, *constants)` with `jax.make_jaxpr` and
emits one or a few standard ONNX operators (opset `OPSET`) per jaxpr equation, through the
table `EMITTERS` (primitive name -> emitter). Calls (`jit`, `custom_jvp_call`,
`custom_vjp_call`, remat) are inlined; `cond` evaluates every branch and selects the result
(jaxprs have no side effects). `constants` become the model's initializers, so whatever the
function derives from them (e.g. ±1 signs unpacked from uint32 words) is computed in the
graph, which keeps the file at the constants' size; onnxruntime folds such subgraphs once when
a session loads. Small results of values the conversion knows (literals, iotas and the index
arithmetic on them) are computed here and stored instead.

Dynamic batch: an input dimension given as None is the batch. The function is traced with a
symbolic batch (`jax.export.symbolic_shape`), so sizes that depend on it stay expressions;
each must be affine in the batch (size at batch 2 + slope·(batch − 2)). Emitters read their
output shapes from these affine dimensions: a reshape or broadcast over the batch gets its
target shape computed in the graph from the input's `Shape` (a -1 where one dimension
suffices), and `dim_as_value` (e.g. a mean's count) becomes the same arithmetic.
Layouts: JAX's NHWC convolutions become ONNX's NCHW `Conv` between two transposes;
dot_generals become `MatMul` where they are one, else `Einsum`.

Exactness: every emitted operator computes what the primitive computes, up to float rounding.
Runtimes' graph rewrites may change that rounding (onnxruntime's ConvMulFusion, which
`bhvit_jax.deploy_runtime` turns off). Gathers are those of array indexing, with indices in
range (ONNX has no fill mode). An unsupported primitive, or a form of one that ONNX cannot
express here, raises `config_lib.UserError` naming it.
"""
import dataclasses
import string

import jax
import jax.extend.core as jex
import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper

from bhvit_jax import config_lib

OPSET = 18  # ReduceMax/ReduceMin take their axes as an input from 18 on
IR_VERSION = 8  # the oldest IR of opset 18: the widest range of runtimes loads it
BATCH = 'batch'
FOLD_SIZE = 64  # the most elements of results the conversion computes itself


@dataclasses.dataclass(frozen=True)
class Value:
  """A tensor of the graph: its name, dtype and shape at batch 2 with each dim's batch slope;
  `value`: its numpy value where the conversion knows it (literals, the jaxpr's constants
  and what is folded from them)."""
  name: str
  dtype: np.dtype
  shape: tuple
  slope: tuple
  value: np.ndarray = dataclasses.field(default=None, compare=False)

  @property
  def dynamic(self):
    return tuple(i for i, s in enumerate(self.slope) if s)


class Graph:
  """The nodes and initializers being built, and the graph's batch size tensor."""

  def __init__(self):
    self.nodes, self.initializers, self._count = [], [], 0
    self._consts, self._dims = {}, {}  # small constants and batch-dependent dims, shared
    self.batch = None  # int64 [1]: the batch size, set by `to_onnx` when it is dynamic

  def fresh(self, hint='t'):
    self._count += 1
    return f'{hint}_{self._count}'

  def const(self, value, dtype=None):
    array = np.asarray(value, dtype)
    key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
    if key not in self._consts:
      name = self.fresh('c')
      self.initializers.append(numpy_helper.from_array(array, name))
      if key is None:
        return name
      self._consts[key] = name
    return self._consts[key]

  def prune(self, outputs):
    """Drops the nodes and initializers that no output depends on (unused weights, the
    results a traced function discards)."""
    needed, kept = set(outputs), []
    for node in reversed(self.nodes):
      if needed.intersection(node.output):
        kept.append(node)
        needed.update(node.input)
    self.nodes = kept[::-1]
    self.initializers = [i for i in self.initializers if i.name in needed]

  def op(self, op_type, inputs, n_out=1, **attrs):
    outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
    self.nodes.append(helper.make_node(op_type, list(inputs), outputs, **attrs))
    return outputs[0] if n_out == 1 else outputs

  def dim(self, size, slope):
    """int64 `[1]`: size + slope·(batch − 2) (sizes are those at batch 2)."""
    if (size, slope) not in self._dims:
      name = self.batch if slope == 1 else self.op('Mul', [self.batch,
                                                           self.const([slope], np.int64)])
      offset = size - 2 * slope
      self._dims[size, slope] = (self.op('Add', [name, self.const([offset], np.int64)])
                                 if offset else name)
    return self._dims[size, slope]

  def dims(self, shape, slope, fixed=None):
    """int64 `[len(shape)]` tensor of an affine shape; `fixed`: a value for its dynamic dims
    instead (-1 in a reshape), where only one of them is dynamic."""
    if fixed is not None or not any(slope):
      return self.const([fixed if s and fixed is not None else d
                         for d, s in zip(shape, slope)], np.int64)
    key = (shape, slope)
    if key not in self._dims:
      self._dims[key] = self.op('Concat', [self.dim(d, s) if s else self.const([d], np.int64)
                                           for d, s in zip(shape, slope)], axis=0)
    return self._dims[key]


def _affine(dim):
  """(size at batch 2, growth per image) of a dimension: an int, or a DimExpr of the batch."""
  if isinstance(dim, (int, np.integer)):
    return int(dim), 0
  # jax has no public evaluator of a symbolic dimension.
  size = [int(dim._evaluate({BATCH: b})) for b in (2, 3, 4)]  # pylint: disable=protected-access
  if size[2] - size[1] != size[1] - size[0]:
    raise config_lib.UserError(f'the ONNX export needs dimensions affine in the batch, not {dim}')
  return size[0], size[1] - size[0]


def _value(name, aval):
  shape, slope = zip(*map(_affine, aval.shape)) if aval.shape else ((), ())
  return Value(name, np.dtype(aval.dtype), tuple(shape), tuple(slope))


def _unsupported(what):
  raise config_lib.UserError(f'the ONNX export does not support the JAX primitive {what}')


def _elementwise(op_type):
  def emit(g, eqn, ins, outs):
    del eqn, outs
    return [g.op(op_type, [v.name for v in ins])]
  return emit


def _bitwise(logical, bitwise):
  """`and`, `or`, `xor`, `not`: logical on bool, bitwise on integers."""
  def emit(g, eqn, ins, outs):
    del eqn, outs
    return [g.op(logical if ins[0].dtype == np.bool_ else bitwise, [v.name for v in ins])]
  return emit


def _compose(*op_types):
  """Unary ops applied in turn."""
  def emit(g, eqn, ins, outs):
    del eqn, outs
    name = ins[0].name
    for op_type in op_types:
      name = g.op(op_type, [name])
    return [name]
  return emit


def _identity(g, eqn, ins, outs):
  del g, eqn, outs
  return [v.name for v in ins]


def _square(g, eqn, ins, outs):
  del eqn, outs
  return [g.op('Mul', [ins[0].name, ins[0].name])]


def _erfc(g, eqn, ins, outs):
  del eqn, outs
  return [g.op('Sub', [g.const(1, ins[0].dtype), g.op('Erf', [ins[0].name])])]


def _ne(g, eqn, ins, outs):
  del eqn, outs
  return [g.op('Not', [g.op('Equal', [v.name for v in ins])])]


def _rem(g, eqn, ins, outs):
  del eqn, outs
  return [g.op('Mod', [v.name for v in ins], fmod=1)]  # C's fmod: the dividend's sign


def _integer_pow(g, eqn, ins, outs):
  del outs
  y = eqn.params['y']
  if y < 1:
    _unsupported(f'integer_pow with exponent {y}')
  name = ins[0].name
  for _ in range(y - 1):
    name = g.op('Mul', [name, ins[0].name])
  return [name]


def _round(g, eqn, ins, outs):
  del outs
  if eqn.params['rounding_method'] != jax.lax.RoundingMethod.TO_NEAREST_EVEN:
    _unsupported('round away from zero (ONNX rounds halves to even)')
  return [g.op('Round', [ins[0].name])]


def _shift(direction):
  """shift_left / shift_right_logical: signed operands as unsigned; shifts past the width
  give 0 as in JAX (ONNX leaves them undefined)."""
  def emit(g, eqn, ins, outs):
    del eqn, outs
    x, s = ins
    unsigned = np.dtype(f'uint{x.dtype.itemsize * 8}')
    cast = lambda name, dtype: name if x.dtype == dtype else g.op(
        'Cast', [name], to=helper.np_dtype_to_tensor_dtype(dtype))
    shifted = g.op('BitShift', [cast(x.name, unsigned), cast(s.name, unsigned)],
                   direction=direction)
    past = g.op('GreaterOrEqual', [g.op('Cast', [s.name], to=onnx.TensorProto.INT64),
                                   g.const(x.dtype.itemsize * 8, np.int64)])
    return [cast(g.op('Where', [past, g.const(0, unsigned), shifted]), x.dtype)]
  return emit


def _convert(g, eqn, ins, outs):
  del eqn
  return [g.op('Cast', [ins[0].name], to=helper.np_dtype_to_tensor_dtype(outs[0].dtype))]


def _select_n(g, eqn, ins, outs):
  """`cases[which]`: a chain of Wheres (an index `which` compared to each case number)."""
  del eqn, outs
  which, *cases = ins
  if which.dtype == np.bool_:
    return [g.op('Where', [which.name, cases[1].name, cases[0].name])] if cases[1:] else [
        cases[0].name]
  result = cases[-1].name
  for i in range(len(cases) - 2, -1, -1):
    pick = g.op('Equal', [which.name, g.const(i, which.dtype)])
    result = g.op('Where', [pick, cases[i].name, result])
  return [result]


def _reduce(op_type):
  def emit(g, eqn, ins, outs):
    del outs
    axes = g.const(eqn.params['axes'], np.int64)
    return [g.op(op_type, [ins[0].name, axes], keepdims=0)]
  return emit


def _reduce_logical(op_type):
  """reduce_and / reduce_or over bools as the min / max of 0/1 integers."""
  def emit(g, eqn, ins, outs):
    as_int = g.op('Cast', [ins[0].name], to=onnx.TensorProto.INT32)
    reduced = _reduce(op_type)(g, eqn, [dataclasses.replace(ins[0], name=as_int)], outs)[0]
    return [g.op('Cast', [reduced], to=onnx.TensorProto.BOOL)]
  return emit


def _arg(op_type):
  def emit(g, eqn, ins, outs):
    (axis,) = eqn.params['axes']
    index = g.op(op_type, [ins[0].name], axis=axis, keepdims=0, select_last_index=0)
    return [g.op('Cast', [index], to=helper.np_dtype_to_tensor_dtype(outs[0].dtype))]
  return emit


def _reshape(g, eqn, ins, outs):
  if eqn.params.get('dimensions') is not None:
    _unsupported('reshape with dimensions')
  out = outs[0]
  fixed = -1 if len(out.dynamic) == 1 else None
  return [g.op('Reshape', [ins[0].name, g.dims(out.shape, out.slope, fixed)])]


def _broadcast_in_dim(g, eqn, ins, outs):
  """Unsqueeze the new axes, then Expand only the dims that differ from the operand's."""
  x, out = ins[0], outs[0]
  kept = eqn.params['broadcast_dimensions']
  new = [i for i in range(len(out.shape)) if i not in kept]
  name = g.op('Unsqueeze', [x.name, g.const(new, np.int64)]) if new else x.name
  shape, slope = [1] * len(out.shape), [0] * len(out.shape)
  for i, d in enumerate(kept):
    shape[d], slope[d] = x.shape[i], x.slope[i]
  if (tuple(shape), tuple(slope)) == (out.shape, out.slope):
    return [name]
  target = [(1, 0) if (d, s) == pair else pair
            for d, s, pair in zip(shape, slope, zip(out.shape, out.slope))]
  return [g.op('Expand', [name, g.dims(*map(tuple, zip(*target)))])]


def _squeeze(g, eqn, ins, outs):
  del outs
  return [g.op('Squeeze', [ins[0].name, g.const(eqn.params['dimensions'], np.int64)])]


def _transpose(g, eqn, ins, outs):
  del outs
  return [g.op('Transpose', [ins[0].name], perm=list(eqn.params['permutation']))]


def _concatenate(g, eqn, ins, outs):
  del outs
  return [g.op('Concat', [v.name for v in ins], axis=eqn.params['dimension'])]


def _stack(g, eqn, ins, outs):
  del outs
  axis = g.const([eqn.params['axis']], np.int64)
  return [g.op('Concat', [g.op('Unsqueeze', [v.name, axis]) for v in ins],
               axis=eqn.params['axis'])]


def _tile(g, eqn, ins, outs):
  del outs
  return [g.op('Tile', [ins[0].name, g.const(eqn.params['reps'], np.int64)])]


def _split(g, eqn, ins, outs):
  sizes = [_affine(n) for n in eqn.params['sizes']]
  if any(slope for _, slope in sizes):
    _unsupported('split of the batch dimension')
  names = g.op('Split', [ins[0].name, g.const([n for n, _ in sizes], np.int64)],
                n_out=len(outs), axis=eqn.params['axis'])
  return [names] if len(outs) == 1 else names


def _slice(g, eqn, ins, outs):
  """A Slice; over a batch dimension all of it or bounds that do not depend on the batch."""
  del outs
  x = ins[0]
  strides = eqn.params['strides'] or (1,) * len(x.shape)
  axes, starts, ends, steps = [], [], [], []
  for i, (start, limit, step) in enumerate(zip(eqn.params['start_indices'],
                                               eqn.params['limit_indices'], strides)):
    (start, start_slope), (limit, limit_slope) = _affine(start), _affine(limit)
    if (start, start_slope, limit, limit_slope, step) == (0, 0, x.shape[i], x.slope[i], 1):
      continue
    if start_slope or limit_slope:
      _unsupported('slice with bounds that depend on the batch')
    for values, v in zip((axes, starts, ends, steps), (i, start, limit, step)):
      values.append(v)
  if not axes:
    return [x.name]
  return [g.op('Slice', [x.name] + [g.const(v, np.int64) for v in (starts, ends, axes, steps)])]


def _pad(g, eqn, ins, outs):
  del outs
  x, value = ins
  config = eqn.params['padding_config']
  if any(interior for _, _, interior in config):
    _unsupported('pad with interior padding')
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
  return [g.op('Pad', [x.name, g.const(pads, np.int64), value.name], mode='constant')]


def _iota(g, eqn, ins, outs):
  """A constant arange along `dimension`, expanded over a batch dimension if it has one."""
  del ins
  out, dim = outs[0], eqn.params['dimension']
  if out.slope[dim]:
    _unsupported('iota along the batch dimension')
  shape = [1 if s else d for d, s in zip(out.shape, out.slope)]
  index = [1] * len(shape)
  index[dim] = shape[dim]
  values = np.broadcast_to(np.arange(shape[dim], dtype=out.dtype).reshape(index), shape)
  name = g.const(np.ascontiguousarray(values))
  return [g.op('Expand', [name, g.dims(tuple(shape), out.slope)])] if out.dynamic else [name]


def _reduce_window(kind):
  """reduce_window_sum / _max / _min as one-channel pooling over the windowed dims, every
  other dim (the batch included) folded into the pooling's batch: a sum is a convolution
  with a kernel of ones."""
  def emit(g, eqn, ins, outs):
    p, x, out = eqn.params, ins[0], outs[0]
    if any(d != 1 for d in p['base_dilation']):
      _unsupported(f'reduce_window_{kind} with base dilation')
    windowed = [i for i, w in enumerate(zip(p['window_dimensions'], p['window_strides'],
                                            map(tuple, p['padding']), p['window_dilation']))
                if w != (1, 1, (0, 0), 1)]
    if not windowed:
      return [x.name]
    if any(x.slope[i] for i in windowed):
      _unsupported(f'reduce_window_{kind} over the batch dimension')
    perm = [i for i in range(len(x.shape)) if i not in windowed] + windowed
    flat = g.op('Reshape', [g.op('Transpose', [x.name], perm=perm),
                            g.const([-1, 1] + [x.shape[i] for i in windowed], np.int64)])
    kernel = [p['window_dimensions'][i] for i in windowed]
    attrs = dict(strides=[p['window_strides'][i] for i in windowed],
                 pads=[p['padding'][i][0] for i in windowed] +
                 [p['padding'][i][1] for i in windowed],
                 dilations=[p['window_dilation'][i] for i in windowed])
    if kind == 'sum':
      y = g.op('Conv', [flat, g.const(np.ones([1, 1] + kernel, x.dtype))], **attrs)
    else:
      sign = (lambda n: n) if kind == 'max' else (lambda n: g.op('Neg', [n]))
      y = sign(g.op('MaxPool', [sign(flat)], kernel_shape=kernel, **attrs))
    shape, slope = (tuple(v[i] for i in perm) for v in (out.shape, out.slope))
    fixed = -1 if sum(map(bool, slope)) == 1 else None
    y = g.op('Reshape', [y, g.dims(shape, slope, fixed)])
    return [g.op('Transpose', [y], perm=[int(i) for i in np.argsort(perm)])]
  return emit


def _conv(g, eqn, ins, outs):
  """conv_general_dilated as an NCHW Conv: operands and result transposed by the dimension
  numbers (each spec lists the dims as batch/out-feature, feature/in-feature, spatial...)."""
  del outs
  p = eqn.params
  if any(d != 1 for d in p['lhs_dilation']) or p['batch_group_count'] != 1:
    _unsupported('conv_general_dilated with lhs dilation or batch groups')
  lhs_spec, rhs_spec, out_spec = p['dimension_numbers']
  lhs = g.op('Transpose', [ins[0].name], perm=list(lhs_spec))
  rhs = g.op('Transpose', [ins[1].name], perm=list(rhs_spec))
  pads = [lo for lo, _ in p['padding']] + [hi for _, hi in p['padding']]
  y = g.op('Conv', [lhs, rhs], strides=list(p['window_strides']), pads=pads,
           dilations=list(p['rhs_dilation']), group=p['feature_group_count'])
  return [g.op('Transpose', [y], perm=[int(i) for i in np.argsort(out_spec)])]


def _dot_general(g, eqn, ins, outs):
  """A MatMul where dot_general is one (leading batch dims, the lhs's last dim contracted
  with the rhs's first non-batch dim, or with its last: a transposed rhs), else an Einsum;
  both give batch dims, then the lhs's free dims, then the rhs's (dot_general's order)."""
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  lhs, rhs = ins
  names = [v.name for v in ins]
  if lhs.dtype != outs[0].dtype:
    names = [g.op('Cast', [n], to=helper.np_dtype_to_tensor_dtype(outs[0].dtype))
             for n in names]
  nb, rank = len(lb), len(rhs.shape)
  if (lb == rb == tuple(range(nb)) and lc == (len(lhs.shape) - 1,) and rank == nb + 2 and
      (nb == 0 or len(lhs.shape) == rank) and rc[0] in (nb, nb + 1)):
    if rc[0] == nb + 1:
      names[1] = g.op('Transpose', [names[1]], perm=list(range(nb)) + [nb + 1, nb])
    return [g.op('MatMul', names)]
  letters = iter(string.ascii_letters)
  left = [next(letters) for _ in lhs.shape]
  right = [next(letters) for _ in rhs.shape]
  for i, j in zip(lc + lb, rc + rb):
    right[j] = left[i]
  out = ([left[i] for i in lb] + [left[i] for i in range(len(left)) if i not in lc + lb] +
         [right[j] for j in range(len(right)) if j not in rc + rb])
  return [g.op('Einsum', names, equation=f'{"".join(left)},{"".join(right)}->{"".join(out)}')]


def _window(g, x, starts, sizes):
  """`x[starts : starts + sizes]` with each start clamped into range, as `dynamic_slice`
  does; `starts`: per axis an int, or an int64 `[1]` tensor if only the graph knows it;
  `sizes`: affine dims. Known starts give a plain Slice."""
  whole = [(i, size, slope) == (0, d, s)
           for i, (size, slope), d, s in zip(starts, sizes, x.shape, x.slope)]
  inside = [isinstance(i, int) and not slope and 0 <= i <= d - s - size  # d - s: at batch 1
            for i, (size, slope), d, s in zip(starts, sizes, x.shape, x.slope)]
  if all(w or i for w, i in zip(whole, inside)):
    axes = [a for a, w in enumerate(whole) if not w]
    if not axes:
      return x.name
    bounds = [[starts[a] for a in axes], [starts[a] + sizes[a][0] for a in axes], axes]
    return g.op('Slice', [x.name] + [g.const(b, np.int64) for b in bounds])
  size = g.dims(*zip(*sizes))
  start = g.op('Concat', [g.const([i], np.int64) if isinstance(i, int) else i
                          for i in starts], axis=0)
  start = g.op('Max', [g.op('Min', [start, g.op('Sub', [g.dims(x.shape, x.slope), size])]),
                       g.const([0] * len(sizes), np.int64)])
  return g.op('Slice', [x.name, start, g.op('Add', [start, size])])


def _index(g, scalar):
  """An index Value as an int, or as an int64 `[1]` tensor if only the graph knows it."""
  if scalar.value is not None:
    return int(scalar.value)
  return g.op('Cast', [g.op('Reshape', [scalar.name, g.const([1], np.int64)])],
              to=onnx.TensorProto.INT64)


def _dynamic_slice(g, eqn, ins, outs):
  del outs
  x, *starts = ins
  return [_window(g, x, [_index(g, v) for v in starts],
                  [_affine(d) for d in eqn.params['slice_sizes']])]


def _along_axis(d, sizes, x, indices, out_rank):
  """The axis of a gather that picks one element along it at every position of the output
  (`jnp.take_along_axis`), output dims lined up with the operand's; else None."""
  if (len(d.collapsed_slice_dims) != 1 or d.start_index_map != d.collapsed_slice_dims or
      indices.shape[-1] != 1 or len(indices.shape) - 1 + len(d.offset_dims) != out_rank):
    return None
  axis = d.collapsed_slice_dims[0]
  offsets = [i for i in range(len(x.shape))
             if i != axis and i not in d.operand_batching_dims]
  batched = dict(zip(d.start_indices_batching_dims, d.operand_batching_dims))
  index_dims = iter(batched.get(k, axis) for k in range(len(indices.shape) - 1))
  offset_dims = iter(offsets)
  operand_dim = [next(offset_dims) if p in d.offset_dims else next(index_dims)
                 for p in range(out_rank)]
  full = all(sizes[i] == (x.shape[i], x.slope[i]) for i in offsets)
  return axis if full and operand_dim == list(range(len(x.shape))) else None


def _gather(g, eqn, ins, outs):
  """The gathers of array indexing, with in-range indices (ONNX has no fill mode):
  `jnp.take_along_axis` as a GatherElements (its indices broadcast over the operand's sliced
  dims), and one window at a start vector (`x[i]`, `x[..., i:j]` under a symbolic batch) as a
  clamped Slice without the collapsed dims."""
  x, indices = ins
  out = outs[0]
  d = eqn.params['dimension_numbers']
  sizes = [_affine(s) for s in eqn.params['slice_sizes']]
  axis = _along_axis(d, sizes, x, indices, len(out.shape))
  if axis is not None:
    index = g.op('Squeeze', [indices.name, g.const([len(indices.shape) - 1], np.int64)])
    if d.offset_dims:
      index = g.op('Expand', [g.op('Unsqueeze', [index, g.const(d.offset_dims, np.int64)]),
                              g.dims(out.shape, out.slope)])
    return [g.op('GatherElements', [x.name, index], axis=axis)]
  if (len(indices.shape) == 1 and not d.operand_batching_dims and
      d.offset_dims == tuple(range(len(out.shape)))):
    position = {axis: j for j, axis in enumerate(d.start_index_map)}
    if indices.value is not None:
      starts = [int(indices.value[position[i]]) if i in position else 0
                for i in range(len(x.shape))]
    else:
      vector = g.op('Cast', [indices.name], to=onnx.TensorProto.INT64)
      starts = [g.op('Slice', [vector, g.const([position[i]], np.int64),
                               g.const([position[i] + 1], np.int64)])
                if i in position else 0 for i in range(len(x.shape))]
    window = _window(g, x, starts, sizes)
    if not d.collapsed_slice_dims:
      return [window]
    return [g.op('Squeeze', [window, g.const(d.collapsed_slice_dims, np.int64)])]
  return _unsupported(f'gather other than take_along_axis or one window ({d})')


def _dim_as_value(g, eqn, ins, outs):
  del ins
  size = g.dims(*zip(_affine(eqn.params['dim'])))
  return [g.op('Cast', [g.op('Squeeze', [size])],
               to=helper.np_dtype_to_tensor_dtype(outs[0].dtype))]


EMITTERS = {
    'add': _elementwise('Add'), 'sub': _elementwise('Sub'), 'mul': _elementwise('Mul'),
    'div': _elementwise('Div'), 'max': _elementwise('Max'), 'min': _elementwise('Min'),
    'pow': _elementwise('Pow'), 'neg': _elementwise('Neg'), 'exp': _elementwise('Exp'),
    'log': _elementwise('Log'), 'abs': _elementwise('Abs'), 'sqrt': _elementwise('Sqrt'),
    'sign': _elementwise('Sign'), 'floor': _elementwise('Floor'), 'ceil': _elementwise('Ceil'),
    'tanh': _elementwise('Tanh'), 'logistic': _elementwise('Sigmoid'),
    'erf': _elementwise('Erf'), 'sin': _elementwise('Sin'), 'cos': _elementwise('Cos'),
    'eq': _elementwise('Equal'), 'lt': _elementwise('Less'), 'gt': _elementwise('Greater'),
    'le': _elementwise('LessOrEqual'), 'ge': _elementwise('GreaterOrEqual'), 'ne': _ne,
    'and': _bitwise('And', 'BitwiseAnd'), 'or': _bitwise('Or', 'BitwiseOr'),
    'xor': _bitwise('Xor', 'BitwiseXor'), 'not': _bitwise('Not', 'BitwiseNot'),
    'shift_left': _shift('LEFT'), 'shift_right_logical': _shift('RIGHT'),
    'rsqrt': _compose('Sqrt', 'Reciprocal'), 'square': _square, 'erfc': _erfc, 'rem': _rem,
    'integer_pow': _integer_pow, 'round': _round, 'convert_element_type': _convert,
    'select_n': _select_n, 'copy': _identity, 'copy_p': _identity,
    'stop_gradient': _identity, 'optimization_barrier': _identity,
    'reduce_sum': _reduce('ReduceSum'), 'reduce_max': _reduce('ReduceMax'),
    'reduce_min': _reduce('ReduceMin'), 'reduce_prod': _reduce('ReduceProd'),
    'reduce_window_sum': _reduce_window('sum'), 'reduce_window_max': _reduce_window('max'),
    'reduce_window_min': _reduce_window('min'),
    'reduce_and': _reduce_logical('ReduceMin'), 'reduce_or': _reduce_logical('ReduceMax'),
    'argmax': _arg('ArgMax'), 'argmin': _arg('ArgMin'),
    'reshape': _reshape, 'broadcast_in_dim': _broadcast_in_dim, 'squeeze': _squeeze,
    'transpose': _transpose, 'concatenate': _concatenate, 'stack': _stack, 'split': _split,
    'tile': _tile, 'slice': _slice, 'pad': _pad, 'iota': _iota, 'conv_general_dilated': _conv,
    'dot_general': _dot_general, 'gather': _gather, 'dynamic_slice': _dynamic_slice,
    'dim_as_value': _dim_as_value,
}
# Calls whose body is inlined: the parameter holding it.
CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr',
         'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr',
         'checkpoint': 'jaxpr', 'remat': 'jaxpr'}


def _open(jaxpr):
  """(Jaxpr, consts) of a closed or open jaxpr."""
  return (jaxpr.jaxpr, jaxpr.consts) if isinstance(jaxpr, jex.ClosedJaxpr) else (jaxpr, ())


class _Lowering:
  """Walks a jaxpr and its calls, binding each var to a `Value`."""

  def __init__(self, graph):
    self.g = graph

  def const(self, value, dtype=None):
    value = np.asarray(value, dtype)
    return Value(self.g.const(value), value.dtype, value.shape, (0,) * value.ndim, value)

  def run(self, jaxpr, consts, args):
    """The Values of `jaxpr`'s outputs with its invars bound to `args` (Values)."""
    env = dict(zip(jaxpr.invars, args))
    env.update((var, self.const(c)) for var, c in zip(jaxpr.constvars, consts))
    read = lambda v: self.const(v.val, v.aval.dtype) if isinstance(v, jex.Literal) else env[v]
    for eqn in jaxpr.eqns:
      outs = self.equation(eqn, [read(v) for v in eqn.invars],
                           [_value('', v.aval) for v in eqn.outvars])
      env.update((var, out) for var, out in zip(eqn.outvars, outs)
                 if not isinstance(var, jex.DropVar))
    return [read(v) for v in jaxpr.outvars]

  def equation(self, eqn, ins, outs):
    name = eqn.primitive.name
    if name in CALLS:
      return self.run(*_open(eqn.params[CALLS[name]]), ins)
    if name == 'cond':  # every branch, then select_n on the index
      branches = [self.run(*_open(b), ins[1:]) for b in eqn.params['branches']]
      names = [_select_n(self.g, eqn, [ins[0], *cases], [out])[0]
               for cases, out in zip(zip(*branches), outs)]
    elif self.foldable(eqn, ins, outs):
      results = eqn.primitive.bind(*[v.value for v in ins], **eqn.params)
      return [self.const(r) for r in (results if eqn.primitive.multiple_results
                                      else [results])]
    elif name in EMITTERS:
      names = EMITTERS[name](self.g, eqn, ins, outs)
    else:
      _unsupported(name)
    return [dataclasses.replace(out, name=n) for out, n in zip(outs, names)]

  @staticmethod
  def foldable(eqn, ins, outs):
    """Whether to compute an equation now: small results of known inputs (index arithmetic;
    a dim_as_value is known only in the graph)."""
    return (eqn.primitive.name in EMITTERS and eqn.primitive.name != 'dim_as_value' and
            all(v.value is not None for v in ins) and not any(o.dynamic for o in outs) and
            sum(int(np.prod(o.shape)) for o in outs) <= FOLD_SIZE)


def to_onnx(fn, inputs, constants=(), *, input_names, output_names, batch=None,
            model_name='jax') -> onnx.ModelProto:
  """ONNX model of `fn(*inputs, *constants)`.

  Args:
    fn: a JAX function of arrays returning an array or a tuple of arrays.
    inputs: the graph inputs as (shape, dtype); a None dim is the batch.
    constants: numpy arrays, stored as initializers.
    input_names, output_names: names of the graph's inputs and outputs.
    batch: None: the batch stays symbolic (`BATCH`); an int: it is fixed to that size.
  """
  constants = [np.asarray(c) for c in constants]
  size = jax.export.symbolic_shape(BATCH)[0] if batch is None else batch
  specs = ([jax.ShapeDtypeStruct(tuple(size if d is None else d for d in shape), dtype)
            for shape, dtype in inputs] +
           [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in constants])
  traced = jax.make_jaxpr(fn)(*specs)
  graph = Graph()
  args = [_value(name, spec) for name, spec in zip(input_names, specs)]
  for arg in args:
    if arg.dynamic and graph.batch is None:
      axis = arg.dynamic[0]
      graph.batch = graph.op('Shape', [arg.name], start=axis, end=axis + 1)
  for name, array in zip([f'constant_{i}' for i in range(len(constants))], constants):
    graph.initializers.append(numpy_helper.from_array(array, name))
    args.append(Value(name, array.dtype, array.shape, (0,) * array.ndim))
  results = _Lowering(graph).run(traced.jaxpr, traced.consts, args)
  for name, value in zip(output_names, results):
    graph.nodes.append(helper.make_node('Identity', [value.name], [name]))
  graph.prune(output_names)

  def info(value, name):  # other sizes that depend on the batch stay unnamed
    dims = [d if not s else BATCH if (d, s) == (2, 1) else None
            for d, s in zip(value.shape, value.slope)]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                         dims)

  model = helper.make_model(
      helper.make_graph(graph.nodes, model_name,
                        [info(a, n) for a, n in zip(args, input_names)],
                        [info(r, n) for r, n in zip(results, output_names)],
                        graph.initializers),
      opset_imports=[helper.make_opsetid('', OPSET)], producer_name='bhvit_jax')
  model.ir_version = IR_VERSION
  return model
