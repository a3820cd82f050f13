"""The speed-oriented formulations give the plain model's numbers.

Each fast path (per-group convolutions, rematerialized blocks) is checked against an
independent formula or the plain path in float64, where both follow the same sign decisions,
so outputs, gradients and BatchNorm updates must agree to rounding. Blocks, not whole models,
keep the compile time (the cost of these tests on CPU) small.
"""
import functools
import pathlib

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import layers
from bhvit_jax import quantizers
from bhvit_jax import model as model_lib
from bhvit_jax import remat as remat_lib

SMALL = dict(hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
             mlp_sizes=(32, 64, 128, 256), num_classes=5, image_size=32, patch_size=2,
             window_size=1, weight_bits=1, input_bits=1, norm='batch', shift3=True,
             shift5=True, some_fp=True, gsb=False)


def direct_grouped_conv(x, kernel, dilation, groups):
  """Zero-padded 'same' grouped dilated conv by explicit loops (NHWC, HWIO), float64."""
  b, h, w, c = x.shape
  k, _, cin, out = kernel.shape
  pad = dilation * (k // 2)
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  y = np.zeros((b, h, w, out))
  per_group = out // groups
  for o in range(out):
    g = o // per_group
    for i in range(k):
      for j in range(k):
        patch = xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w,
                   g * cin:(g + 1) * cin]
        y[..., o] += patch @ kernel[i, j, :, o]
  return y


@pytest.mark.parametrize('dilation', [1, 3])
def test_split_group_conv_matches_direct_convolution(x64, dilation):
  rng = np.random.RandomState(0)
  x = rng.randn(2, 7, 7, 8)
  kernel = rng.randn(3, 3, 2, 8)
  expected = direct_grouped_conv(x, kernel, dilation, groups=4)
  for split in (False, True):
    conv = layers.BinaryConv(8, 3, dilation=dilation, groups=4, padding=dilation,
                             weight_bits=32, input_bits=32, use_bias=False, split_groups=split)
    y = conv.apply({'params': {'kernel': jnp.asarray(kernel)}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-12)


def test_split_group_conv_gradients_match_grouped(x64):
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 9, 9, 8))
  kernel = jnp.asarray(rng.randn(3, 3, 2, 8))
  cotangent = jnp.asarray(rng.randn(2, 9, 9, 8))

  def grads(split):
    conv = layers.BinaryConv(8, 3, dilation=3, groups=4, padding=3, use_bias=False,
                             split_groups=split)
    loss = lambda k, a: jnp.sum(conv.apply({'params': {'kernel': k}}, a) * cotangent)
    return jax.grad(loss, argnums=(0, 1))(kernel, x)

  for plain, fast in zip(grads(False), grads(True)):
    np.testing.assert_allclose(np.asarray(fast), np.asarray(plain), rtol=1e-12, atol=1e-12)


def _lowered_outputs(block, variables, x, grads=True):
  """The jitted train-mode output, BatchNorm updates, eval-mode output and (with `grads`) the
  gradients (params, input) of a module called as `block(x, train)`, lowered."""

  def run(params, x):
    def loss_fn(params, x):
      y, updates = block.apply({**variables, 'params': params}, x, True,
                               mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(5)})
      cotangent = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
      return jnp.sum(y * cotangent), (y, updates['batch_stats'])

    if grads:
      (_, (y, stats)), g = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, x)
    else:
      y, stats = loss_fn(params, x)[1]
    out = {'out': y, 'batch_stats': stats, 'eval': block.apply(variables, x, False)}
    return {**out, 'grads': {'params': g[0], 'input': g[1]}} if grads else out
  return jax.jit(run).lower(variables['params'], x)


def _block_outputs(block, variables, x, grads=True):
  return _lowered_outputs(block, variables, x, grads).compile()(variables['params'], x)


def _assert_trees_close(got, expected, rtol=1e-10, atol=1e-12):
  flat_expected = flax.traverse_util.flatten_dict(expected, sep='/')
  flat_got = flax.traverse_util.flatten_dict(got, sep='/')
  assert flat_got.keys() == flat_expected.keys()
  for name, want in flat_expected.items():
    np.testing.assert_allclose(np.asarray(flat_got[name]), np.asarray(want), rtol=rtol,
                               atol=atol, err_msg=name)


def _spec(**fields):
  return model_lib.BHViT(**SMALL, **fields).spec()


def test_fast_paths_match_plain_model(x64):
  # The whole (small) model on both paths: train-mode logits and BatchNorm updates, eval-mode
  # logits (strided run sums, materialized wide activations). Gradients: the next test.
  x = jnp.asarray(np.random.RandomState(2).randn(2, 32, 32, 3))
  plain = model_lib.BHViT(**SMALL, fast_paths='plain')
  fast = model_lib.BHViT(**SMALL, fast_paths='cpu')
  # Random parameters (cheaper than compiling the init, and no parameter at a neutral value);
  # fresh statistics. The fast model runs on the plain model's variables: flax checks shapes.
  rng = np.random.RandomState(3)
  fill = lambda path, s: (jnp.asarray(rng.uniform(-1, 1, s.shape)) if path[0].key == 'params'
                          else jnp.full(s.shape, path[-1].key == 'var', s.dtype))
  variables = jax.tree_util.tree_map_with_path(
      fill, jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), x, False)))
  lowered = [_lowered_outputs(m, variables, x, grads=False) for m in (plain, fast)]
  expected, got = (low.compile()(variables['params'], x) for low in lowered)
  _assert_trees_close(got, expected)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(expected))
  assert float(jnp.std(expected['eval'])) > 0.1 and float(jnp.std(expected['out'])) > 0.1
  # The switch switches: per-group convolutions and materialization barriers (conditionals on
  # CPU) only on the fast path.
  plain_hlo, fast_hlo = (low.as_text() for low in lowered)
  assert 'feature_group_count = 4' in plain_hlo and 'feature_group_count = 4' not in fast_hlo
  assert 'stablehlo.case' not in plain_hlo and 'stablehlo.case' in fast_hlo


@pytest.mark.parametrize('module', ['block', 'downsample'])
def test_fast_paths_match_plain_gradients(x64, module):
  # Everything the two paths compute differently in training: per-group convolutions, the
  # folded shift stencil and the MLP's views (a conv block), the downsampling's tiled view.
  x = jnp.asarray(np.random.RandomState(2).randn(2, 8, 8, 16))
  make = {'block': lambda spec: model_lib.Block(spec, 'conv', 1, 32),
          'downsample': lambda spec: model_lib.Downsample(spec, 32, full_precision=False)}[module]
  plain, fast = make(_spec(fast_paths='plain')), make(_spec(fast_paths='cpu'))
  variables = plain.init({'params': jax.random.PRNGKey(0)}, x, False)
  expected = _block_outputs(plain, variables, x)
  _assert_trees_close(_block_outputs(fast, variables, x), expected)
  # Not vacuous: the binarized kernels do receive gradient.
  kernel = {'block': ('GC', 'cov3'), 'downsample': ('proj',)}[module]
  grad = functools.reduce(dict.__getitem__, kernel + ('kernel',), expected['grads']['params'])
  assert float(jnp.abs(grad).sum()) > 0


@pytest.mark.parametrize('kind,width', [('attention', 32), ('conv', 16)])
@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_remat_block_matches_plain_block(x64, kind, width, backend, monkeypatch):
  # BHViT(remat_stages=...) wraps every Block of those stages like this. The attention block
  # has every custom-gradient quantizer, which must survive the recomputation; stochastic
  # depth must draw the same mask twice. 'gpu' traces the optimization-barrier branch of
  # remat.opaque (run here on CPU, where it computes the same numbers).
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  x = jnp.asarray(np.random.RandomState(3).randn(2, 4, 4, width))
  plain = model_lib.Block(_spec(), kind, 2, 64, drop_path=0.5)
  variables = plain.init({'params': jax.random.PRNGKey(1)}, x, False)
  expected = _block_outputs(plain, variables, x)
  remat = remat_lib.remat(model_lib.Block, static_argnums=(2,))(_spec(), kind, 2, 64,
                                                                 drop_path=0.5)
  _assert_trees_close(_block_outputs(remat, variables, x), expected)


def test_recompute_in_backward_keeps_only_inputs_on_cpu():
  # Three 4-layer segments of 1024x1024 activations: saving every layer's output needs ~4x
  # the segment inputs. jax.checkpoint does not lower this on XLA:CPU (the barriers that keep
  # its recomputation apart are dropped there); the wrapper must.
  ws = [jnp.asarray(np.random.RandomState(i).randn(1024, 1024) / 32, jnp.float32)
        for i in range(12)]

  def segment(x, ws):
    for w in ws:
      x = jnp.tanh(x @ w) + x
    return x, ()

  def temp_mib(wrap):
    def loss(x, ws):
      for i in range(0, 12, 4):
        x, _ = wrap(segment)(x, ws[i:i + 4])
      return jnp.sum(x * x)
    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((1024, 1024)), ws).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20

  plain = temp_mib(lambda f: f)
  assert temp_mib(remat_lib.recompute_in_backward) < 0.6 * plain


def test_bfloat16_compute_runs_on_cpu():
  x = jnp.asarray(np.random.RandomState(4).randn(2, 8, 8, 16), jnp.float32)
  f32 = model_lib.Block(_spec(split_groups=True), 'conv', 1, 32)
  variables = f32.init({'params': jax.random.PRNGKey(0)}, x, False)
  bf16 = model_lib.Block(_spec(split_groups=True, dtype=jnp.bfloat16), 'conv', 1, 32)
  out = _block_outputs(bf16, variables, x.astype(jnp.bfloat16))
  assert out['out'].dtype == jnp.bfloat16
  leaves = jax.tree_util.tree_leaves(out['grads']['params'])
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # params stay float32
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)
  reference = np.asarray(f32.apply(variables, x, False))
  # bfloat16 keeps ~3 significant digits; its outputs must still track the float32 ones.
  corr = np.corrcoef(np.asarray(out['eval'], np.float32).ravel(), reference.ravel())[0, 1]
  assert corr > 0.95


@pytest.mark.parametrize('input_bits,recu,view', [(1, False, False), (1, True, True),
                                                  (32, False, True)])
def test_binary_matmul_matches_composed_quantizers(x64, input_bits, recu, view):
  # The fused product (bfloat16 sign operands in float32, one custom gradient) must equal
  # sign_ste(x) @ binarize_weight(w), forward and backward; float64 compares exactly.
  rng = np.random.RandomState(5)
  x = jnp.asarray(rng.randn(3, 5, 24) * 0.7)
  w = jnp.asarray(rng.randn(24, 6))
  cot = jnp.asarray(rng.randn(3, 5, 6))
  xin = x.reshape(3, 5, 4, 6) if view else x
  win = w.reshape(4, 6, 6) if view else w

  def fused(xin, win):
    return jnp.sum(quantizers.binary_matmul(xin, win, input_bits, 1, recu) * cot)

  def composed(x, w):
    return jnp.sum(quantizers.maybe_sign(x, input_bits) @ quantizers.binarize_weight(w, recu)
                   * cot)

  got = jax.value_and_grad(fused, argnums=(0, 1))(xin, win)
  want = jax.value_and_grad(composed, argnums=(0, 1))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
  np.testing.assert_allclose(np.asarray(got[1][0]).reshape(x.shape), want[1][0], rtol=1e-12,
                             atol=1e-12)
  np.testing.assert_allclose(np.asarray(got[1][1]).reshape(w.shape), want[1][1], rtol=1e-12,
                             atol=1e-12)
  assert float(jnp.abs(want[1][1]).sum()) > 0 and float(jnp.abs(want[1][0]).sum()) > 0


def test_binary_matmul_float32_matches_float64():
  rng = np.random.RandomState(6)
  x, w = rng.randn(64, 512), rng.randn(512, 64)
  got = quantizers.binary_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), 1, 1)
  wc = w - w.mean(0)
  want = np.sign(x) @ (np.sign(wc) * np.abs(w).mean(0))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize('c,features', [(8, 32), (32, 8), (24, 8), (12, 96), (96, 12)])
def test_projection_views_match_flat_formula(x64, c, features):
  # Widening (tile residual) and narrowing (run means) computed in [..., k, C] views must equal
  # the flat formula, incl. widths whose runs do not fit the view (96 -> 12: 12 % 8 != 0).
  rng = np.random.RandomState(7)
  x = jnp.asarray(rng.randn(2, 3, 3, c))
  proj = model_lib.Projection(_spec(), features, layerscale=True)
  variables = proj.init(jax.random.PRNGKey(0), x, True)
  params = jax.tree.map(lambda v: v + jnp.asarray(rng.randn(*v.shape)) * 0.3,
                        variables['params'])

  def flat(params, x, train=True):
    p = params
    y = quantizers.sign_ste(x + p['move']) @ quantizers.binarize_weight(p['dense']['kernel'])
    mean, var = (y.mean((0, 1, 2)), y.var((0, 1, 2))) if train else (0.0, 1.0)
    y = (y - mean) / jnp.sqrt(var + 1e-5) * p['norm']['scale'] + p['norm']['bias']
    if features > c:
      residual = jnp.tile(x, (1, 1, 1, features // c))
    else:
      residual = x.reshape(x.shape[:-1] + (features, c // features)).mean(-1)
    y = y + residual - p['rprelu']['move1']
    y = jnp.where(y >= 0, y, p['rprelu']['prelu'] * y) + p['rprelu']['move2']
    return y * p['layerscale']['alpha'] + p['layerscale']['move']

  def views(params, x):
    return proj.apply({**variables, 'params': params}, x, True, mutable=['batch_stats'])[0]

  cot = jnp.asarray(rng.randn(2, 3, 3, features))
  got = jax.value_and_grad(lambda p, x: jnp.sum(views(p, x) * cot), argnums=(0, 1))(params, x)
  want = jax.value_and_grad(lambda p, x: jnp.sum(flat(p, x) * cot), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
  _assert_trees_close(got[1][0], want[1][0])
  np.testing.assert_allclose(got[1][1], want[1][1], rtol=1e-10, atol=1e-12)
  # Eval mode (strided run sums; fresh running statistics are mean 0, variance 1) too.
  ev = proj.apply({**variables, 'params': params}, x, False)
  np.testing.assert_allclose(ev, flat(params, x, train=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('stats_cotangent', [False, True])
def test_batch_norm_gradient_matches_autodiff(x64, stats_cotangent):
  # The hand-written BatchNorm gradient against autodiff of the formula; the statistics'
  # cotangents are symbolic zeros when they only feed the running averages, real otherwise.
  rng = np.random.RandomState(11)
  x, scale, bias = (jnp.asarray(rng.randn(*s)) for s in ((3, 4, 5, 6), (5, 6), (5, 6)))
  cot = jnp.asarray(rng.randn(3, 4, 5, 6))

  def formula(x, scale, bias):
    mean = x.mean((0, 1))
    var = jnp.square(x - mean).mean((0, 1))
    return (x - mean) / jnp.sqrt(var + layers.EPS) * scale + bias, mean, var

  def loss(norm):
    def fn(*args):
      y, mean, var = norm(*args)
      if not stats_cotangent:
        mean, var = jax.lax.stop_gradient((mean, var))
      return jnp.sum(y * cot) + jnp.sum(jnp.sin(mean)) + jnp.sum(jnp.cos(var))
    return jax.value_and_grad(fn, argnums=(0, 1, 2))(x, scale, bias)

  got = loss(lambda *a: layers.batch_norm(*a, 2))
  want = loss(formula)
  chex.assert_trees_all_close(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize('channel_axes', [1, 2])
def test_recomputed_norm_residual_act_matches_plain(x64, channel_axes):
  # Training recomputes RPReLU(norm(y) + residual) in the backward pass: same output,
  # BatchNorm updates and gradients as the chain kept by autodiff (`_norm_residual_act`).
  class Chain(nn.Module):
    fn: object
    spec: object = _spec()

    @nn.compact
    def __call__(self, y, residual, train):
      return self.fn(self, y, residual, train, '_x', channel_axes)

  rng = np.random.RandomState(12)
  y, residual = jnp.asarray(rng.randn(2, 3, 4, 8)), jnp.asarray(rng.randn(2, 3, 1, 8))
  if channel_axes == 1:
    y, residual = y.reshape(2, 3, 32), residual.reshape(2, 3, 8).repeat(4, -1)
  plain = Chain(model_lib._norm_residual_act)
  variables = plain.init(jax.random.PRNGKey(0), y, residual, False)
  params = jax.tree.map(lambda v: v + jnp.asarray(rng.randn(*v.shape)) * 0.3,
                        variables['params'])
  cot = jnp.asarray(rng.randn(*y.shape))

  def run(chain):
    def loss(params, y, residual):
      out, updates = chain.apply({**variables, 'params': params}, y, residual, True,
                                 mutable=['batch_stats'])
      return jnp.sum(out * cot), updates
    (value, updates), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        params, y, residual)
    return {'loss': value, 'batch_stats': updates['batch_stats'],
            'grads': {'params': grads[0], 'y': grads[1], 'residual': grads[2]}}

  got = run(Chain(model_lib.norm_residual_act))
  _assert_trees_close(got, run(plain))


@pytest.mark.parametrize('size, window', [(14, 7), (7, 7), (12, 5), (10, 3)])
def test_global_token_pooling_matches_reduce_window(x64, size, window):
  """The view-summed average equals flax's zero-padded avg_pool, gradients included."""
  x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3), jnp.float64)
  a1 = jnp.asarray([0.0, 0.3, 1.0], jnp.float64)
  pad = ((window // 2, window // 2),) * 2

  def reduce_window(x, a1):
    mx = nn.max_pool(x, (window, window), strides=(window, window), padding=pad)
    avg = nn.avg_pool(x, (window, window), strides=(window, window), padding=pad,
                      count_include_pad=True)
    return (a1 * mx + (1 - a1) * avg).reshape(x.shape[0], -1, x.shape[-1])

  view = lambda x, a1: model_lib.pool_global_tokens(x, window, a1)
  np.testing.assert_allclose(view(x, a1), reduce_window(x, a1), rtol=1e-12, atol=1e-12)
  loss = lambda f: lambda x, a1: jnp.sum(jnp.sin(f(x, a1)))
  for got, want in zip(jax.grad(loss(view), (0, 1))(x, a1),
                       jax.grad(loss(reduce_window), (0, 1))(x, a1)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  # At ties (here every value) the max's gradient goes to one element per window, the first
  # in row order, as PyTorch's max-pool and XLA's reduce-window send it.
  ties = jnp.ones_like(x)
  np.testing.assert_array_equal(jax.grad(loss(view))(ties, a1),
                                jax.grad(loss(reduce_window))(ties, a1))


def _grouped_convs(config_path, *overrides):
  """Grouped convolutions (feature_group_count > 1) in the lowered token mixer of a config."""
  import re  # pylint: disable=g-import-not-at-top
  from bhvit_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(config_path)
  spec = model_lib.build({**config.model, **dict(overrides)}).spec()
  mixer = model_lib.TokenMixer(spec)
  x = jnp.zeros((1, 8, 8, 16))
  variables = jax.eval_shape(lambda: mixer.init(jax.random.PRNGKey(0), x, False))
  text = jax.jit(lambda v, x: mixer.apply(v, x, False)).lower(variables, x).as_text()
  return [int(n) for n in re.findall(r'feature_group_count = (\d+)', text) if int(n) > 1]


def test_split_groups_auto_picks_per_group_convolutions_on_cpu():
  assert jax.default_backend() == 'cpu'
  path = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'bhvit_tiny.py')
  assert not _grouped_convs(path)  # the config's default, 'auto'
  assert _grouped_convs(path, ('split_groups', False))
  assert _grouped_convs(path, ('split_groups', 'False'))  # as a --config override arrives
  assert not _grouped_convs(path, ('split_groups', True))
  assert _grouped_convs(path, ('fast_paths', 'plain'))  # 'auto' follows the fast paths
  assert not _grouped_convs(path, ('fast_paths', 'plain'), ('split_groups', True))
