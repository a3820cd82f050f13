"""The fast paths: the model's math in layouts that a particular backend runs faster.

`model.py` and `layers.py` write every block as the reference's formula in plain jnp. The
functions here compute the same values (up to float rounding) in the shapes that XLA:CPU
compiles well; the model takes them where `enabled(model.fast_paths)` says so:

- `'auto'`: on the backends they help, asked at trace time (today only XLA:CPU);
- `'plain'`: never, the plain formulas on every backend;
- `'cpu'`: always, the CPU layouts on any backend.

Parameter trees are the same on both paths (layouts only reshape the flat parameters), so
checkpoints and the PyTorch converter do not care. `tests/test_fast_paths.py` compares the
two paths; docs/performance.md gives the measured effect of each function.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from bhvit_jax import config_lib

SETTINGS = ('auto', 'plain', 'cpu')


def check(value) -> str:
  """`value` if it is a `fast_paths` setting; UserError otherwise."""
  if value not in SETTINGS:
    raise config_lib.UserError(f'fast_paths={value!r} must be one of {SETTINGS}')
  return value


def enabled(setting: str) -> bool:
  """Whether the fast paths apply. The backend is asked only here, at trace time: a
  multi-process run must not start it before `jax.distributed.initialize`."""
  if check(setting) == 'auto':
    return jax.default_backend() == 'cpu'
  return setting == 'cpu'


def is_float(leaf):
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def opaque(tree, probe):
  """`tree` unchanged, as buffers that XLA neither fuses into their readers nor merges.

  The result is only available once `probe` is. XLA:CPU drops optimization barriers, so there
  this is a conditional whose predicate is true for every value of `probe` (NaN included) but
  known only at run time; other backends honour `lax.optimization_barrier`.
  """
  if jax.default_backend() != 'cpu':
    return jax.lax.optimization_barrier((tree, probe))[0]
  probe = probe.reshape(-1)[0]
  return jax.lax.cond((probe == probe) | (probe != probe), lambda t: t,
                      lambda t: jax.tree_util.tree_map(jnp.zeros_like, t), tree)


def after(tree, probe):
  """`tree` unchanged, as values XLA can only compute once `probe` exists.

  Unlike `opaque`, XLA may still fuse them into their readers, so nothing is copied: on
  XLA:CPU float leaves are multiplied by a 1 that only a conditional on `probe` yields
  (bit-exact), other leaves go through `opaque`; other backends use `lax.optimization_barrier`.
  """
  if jax.default_backend() != 'cpu':
    return jax.lax.optimization_barrier((tree, probe))[0]
  one = opaque(jnp.ones((), jnp.float32), probe)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  others = iter(opaque([leaf for leaf in leaves if not is_float(leaf)], probe))
  return jax.tree_util.tree_unflatten(
      treedef, [leaf * one.astype(leaf.dtype) if is_float(leaf) else next(others)
                for leaf in leaves])


def per_group_conv(conv, x, kernel, groups: int):
  """A grouped convolution as one convolution per group, concatenated along channels.

  Helps XLA:CPU, whose grouped convolution (and far more its gradient) does not use the fast
  convolution kernel that an ungrouped one does. `conv(lhs, rhs, feature_group_count)`;
  x `[B, H, W, C]`, kernel HWIO `[kh, kw, C/groups, O]`.
  """
  xs = jnp.split(x, groups, axis=-1)
  ks = jnp.split(kernel, groups, axis=-1)
  return jnp.concatenate([conv(a, b, 1) for a, b in zip(xs, ks)], axis=-1)


def mean_runs(x, features: int):
  """x itself for equal widths; otherwise the mean of each run of `C/features` channels."""
  c = x.shape[-1]
  if features == c:
    return x
  return jnp.mean(x.reshape(x.shape[:-1] + (features, c // features)), axis=-1)


@dataclasses.dataclass(frozen=True)
class ChannelLayout:
  """How a map from `c` to `f` channels (k-fold wider or narrower) lays out its wide side.

  Plain: everything flat `[..., C]`; the widening shortcut tiles its input k times and the
  narrowing one averages runs of k channels. Fast (`view=True`, for XLA:CPU): the wide side is
  a `[..., k, C/k]` view, so the tiled shortcut is a broadcast along a non-minor axis, which
  XLA:CPU vectorizes where it does not vectorize a loop that indexes its result in another
  shape than its inputs (a tile, or a view computation written out flat). Per-channel layers
  then take `channel_axes=2` and keep their parameters flat.
  """
  c: int
  f: int
  view: bool

  @classmethod
  def of(cls, c: int, f: int, fast: bool):
    """The fast layout where the widths allow a view, the plain one otherwise."""
    wide, narrow = max(c, f), min(c, f)
    fits = wide % narrow == 0 and (c < f or f % (c // f) == 0)
    return cls(c, f, fast and c != f and fits)

  @property
  def in_axes(self) -> int:
    """Channel axes of `input(x)`."""
    return 2 if self.view and self.c > self.f else 1

  @property
  def out_axes(self) -> int:
    """Channel axes of `output(y)`."""
    return 2 if self.view and self.f > self.c else 1

  def input(self, x):
    """`[..., c]` as the layer computes it (narrowing view: `[..., c/f, f]`)."""
    return x.reshape(x.shape[:-1] + (self.c // self.f, self.f)) if self.in_axes == 2 else x

  def output(self, y):
    """`[..., f]` as the layer computes it (widening view: `[..., f/c, c]`)."""
    return y.reshape(y.shape[:-1] + (self.f // self.c, self.c)) if self.out_axes == 2 else y

  def flat(self, y):
    """The layer's result back in the flat `[..., f]` layout."""
    return y.reshape(y.shape[:y.ndim - self.out_axes] + (self.f,))

  def shortcut(self, xv, train: bool):
    """The residual from the input (as `input` lays it out) to the output layout: tiled,
    averaged or the input itself."""
    if self.f > self.c:
      k = self.f // self.c
      return xv[..., None, :] if self.view else jnp.tile(xv, (1,) * (xv.ndim - 1) + (k,))
    if self.in_axes == 2:
      return strided_run_means(xv, train)
    return mean_runs(xv, self.f)

  def materialize(self, y, train: bool):
    """The widened output written once for its readers (inference, fast path).

    In inference the output projection reads it twice, through its sign and its run means;
    XLA:CPU otherwise recomputes the whole chain inside both, one of them written out in the
    flat layout it does not vectorize.
    """
    return opaque(y, y) if self.out_axes == 2 and not train else y


def strided_run_means(xv, train: bool):
  """Run means of a `[..., k, f]` view of `k·f` channels (runs of k), `[..., f]`.

  Inference sums k strided slices, which XLA:CPU keeps out of the next matmul's fusion,
  where a minor-axis reduction runs much slower; training reduces, because a slice's
  gradient is a padded copy per slice while a reduction's is one broadcast.
  """
  *lead, k, f = xv.shape
  runs = xv.reshape(tuple(lead) + (k, f // k, k))
  runs = jnp.mean(runs, axis=-1) if train else sum(runs[..., j] for j in range(k)) / k
  return runs.reshape(tuple(lead) + (f,))


def folded_shifts(x, scales):
  """The shift residuals `sum(shift(x) * alpha + move)` as one per-channel stencil.

  Same values as `layers.shift_residuals`' paths summed one by one: each path is linear in
  rolls of x along H or W, so all of them fold into per-channel weights on at most nine rolled
  copies. Helps XLA:CPU, which emits every roll as a concatenation inside one fused loop and
  does not vectorize it.

  Args:
    x: `[B, H, W, C]`, C divisible by 4.
    scales: `{(kind, reach): (alpha, move)}`, each `[C]` (see `layers.shift_residuals`).
  Returns: `[B, H, W, C]`, the sum over all paths.
  """
  group = jnp.arange(x.shape[-1]) // (x.shape[-1] // 4)
  stencil = {}  # (axis, offset) -> per-channel weight
  def add(axis, offset, weight):
    stencil[axis, offset] = stencil.get((axis, offset), 0) + weight
  for (kind, reach), (alpha, _) in scales.items():
    if kind == 'ch':
      for g, (axis, offset) in enumerate(((1, reach), (1, -reach), (2, reach), (2, -reach))):
        add(axis, offset, jnp.where(group == g, alpha, 0))
    else:
      for offset in range(-reach, reach + 1):
        add({'h': 1, 'w': 2}[kind], offset, alpha / (2 * reach + 1))
  offsets = tuple(stencil)
  weights = jnp.stack([stencil[k] for k in offsets])
  return sum(move for _, move in scales.values()) + roll_stencil(x, weights, offsets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def roll_stencil(x, weights, offsets):
  """`sum_k roll(x, offsets[k]) * weights[k]`.

  Args:
    x: `[..., C]`.
    weights: `[K, C]`.
    offsets: K `(axis, shift)` pairs.
  """
  return sum(jnp.roll(x, shift, axis=axis) * w for (axis, shift), w in zip(offsets, weights))


def _roll_stencil_fwd(x, weights, offsets):
  return roll_stencil(x, weights, offsets), (x, weights)


def _roll_stencil_bwd(offsets, residuals, g):
  # The input gradient is the mirrored stencil applied to g (a per-channel weight commutes
  # with a spatial roll) and each weight's is sum(roll(g, -shift) * x), so the backward pass
  # reads nine rolls of g and x itself. g comes opaque: XLA:CPU otherwise fuses its whole
  # producer (the residual stream's gradient) into every roll; rolls of x would be merged
  # with the forward's and kept alive.
  x, weights = residuals
  g = opaque(g, g)
  dx = roll_stencil(g, weights, tuple((axis, -shift) for axis, shift in offsets))
  axes = tuple(range(x.ndim - 1))
  acc = jnp.promote_types(g.dtype, jnp.float32)  # bfloat16 gradients sum in float32
  dw = jnp.stack([jnp.sum(jnp.roll(g, -shift, axis=axis) * x, axis=axes, dtype=acc)
                  for axis, shift in offsets])
  return dx, dw.astype(weights.dtype)


roll_stencil.defvjp(_roll_stencil_fwd, _roll_stencil_bwd)
