"""Parameter and operation counts (bhvit_jax.ops_count, tools/count_ops.py)."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import model as model_lib
from bhvit_jax import ops_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small all-binary gsb model: grids 24/12/6/3, stage 3 has 4 windows of 3x3 plus 2x2 global
# tokens (13 tokens), stage 4 one window plus one global token (10 tokens).
SMALL = dict(hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
             mlp_sizes=(16, 32, 64, 128), num_classes=10, image_size=48, patch_size=2,
             window_size=3, some_fp=False, gsb=True)


def test_cli_prints_exact_published_tiny_counts():
  out = subprocess.run([sys.executable, 'tools/count_ops.py', '--json'], cwd=ROOT,
                       capture_output=True, text=True, check=True,
                       env={**os.environ, 'PYTHONPATH': ROOT}).stdout
  summary = json.loads(out.strip().splitlines()[-1])
  assert '13,779,960 total' in out
  assert summary['params'] == 13_779_960
  assert round(summary['params_binary'] / 1e6, 2) == 11.94
  assert summary['ops'] == summary['bops'] / 64 + summary['flops']


def test_published_small_counts():
  counts = ops_count.count(model_lib.BHViT(depths=(3, 4, 8, 4)))
  assert counts.params == 22_642_920
  assert round(counts.params_binary / 1e6, 2) == 20.64
  assert counts.params_fp == counts.params - counts.params_binary


def _hand_counts(m):
  """BOPs and FLOPs of SMALL written out from docs/reference.md §4 (batch 1)."""
  grids = [m['image_size'] // m['patch_size'] // 2 ** s for s in range(4)]
  c, r, w = m['hidden_sizes'], m['mlp_sizes'], m['window_size']
  flops = grids[0] ** 2 * c[0] * (m['patch_size'] ** 2 * 3) + c[3] * m['num_classes']
  bops = 0
  for s in range(4):
    n2 = grids[s] ** 2
    bops += 2 * n2 * c[s] * r[s]                        # MLP up and down
    if s < 2:
      bops += 3 * n2 * c[s] * 9 * c[s] // 4             # three grouped 3x3 convs
    else:
      windows, tokens = (grids[s] // w) ** 2, w * w + (grids[s] // w) ** 2
      bops += 3 * windows * tokens * c[s] * c[s]        # q, k, v
      bops += windows * tokens * tokens * c[s]          # q·kᵀ
      bops += 3 * windows * tokens * tokens * c[s]      # P·v on the three gsb bit planes
      bops += n2 * c[s] * c[s]                          # output projection
    if s < 3:
      bops += (grids[s] // 2) ** 2 * 2 * c[s] * 4 * c[s]   # binary 2x2 downsampling conv
  return bops, flops


def test_ops_of_small_config_match_hand_computation():
  counts = ops_count.count(model_lib.BHViT(**SMALL))
  bops, flops = _hand_counts(SMALL)
  assert (counts.bops, counts.flops) == (bops, flops)
  assert counts.ops == bops / 64 + flops
  fp = ops_count.count(model_lib.BHViT(**{**SMALL, 'some_fp': True}))
  downsample = sum((48 // 2 // 2 ** s // 2) ** 2 * 2 * c * 4 * c
                   for s, c in enumerate(SMALL['hidden_sizes'][:3]))
  assert (fp.bops, fp.flops) == (bops - downsample, flops + downsample)


def _jaxpr_macs(jaxpr):
  """Brute force: MACs of every dot_general and convolution in a (nested) jaxpr."""
  total = 0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
    elif eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
      total += math.prod(out) * math.prod(rhs[d] for d in spec[1:])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _jaxpr_macs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _jaxpr_macs(sub)
  return total


@pytest.mark.parametrize('fields', [SMALL, {**SMALL, 'gsb': False, 'some_fp': True,
                                             'image_size': 96, 'input_bits': 32}])
def test_macs_equal_brute_force_jaxpr_count(fields):
  m = model_lib.BHViT(**fields)
  images = jnp.zeros((1, m.image_size, m.image_size, 3))
  variables = jax.eval_shape(lambda: m.init({'params': jax.random.PRNGKey(0)}, images))
  jaxpr = jax.make_jaxpr(lambda v, x: m.apply(v, x, train=False))(variables, images)
  counts = ops_count.count(m)
  assert counts.macs == _jaxpr_macs(jaxpr.jaxpr)
  assert counts.macs == sum(r.macs for r in counts.records)


def test_float_attention_products_and_pv_convention():
  fields = {**SMALL, 'input_bits': 32}
  counts = ops_count.count(model_lib.BHViT(**fields))
  attention = [r for r in counts.records if r.op in ('qk', 'pv')]
  assert attention and all(r.bops == 0 and r.flops == r.macs for r in attention)
  bit, flt = (ops_count.count(model_lib.BHViT(**SMALL), pv=pv) for pv in ('bitplanes', 'float'))
  pv_macs = sum(r.macs for r in bit.records if r.op == 'pv')
  assert bit.bops - flt.bops == 3 * pv_macs and flt.flops - bit.flops == pv_macs
  with pytest.raises(ValueError, match='pv must be'):
    ops_count.count(model_lib.BHViT(**SMALL), pv='ternary')


def test_binary_param_classification():
  assert model_lib.is_binary_kernel(('layerA_0', 'GC', 'cov2', 'kernel'), 1, True)
  assert model_lib.is_binary_kernel(('patch_embed1', 'proj', 'kernel'), 1, False)
  assert not model_lib.is_binary_kernel(('patch_embed1', 'proj', 'kernel'), 1, True)
  assert not model_lib.is_binary_kernel(('layerA_0', 'GC', 'cov2', 'kernel'), 32, False)
  assert not model_lib.is_binary_kernel(('classifier', 'kernel'), 1, False)
  assert not model_lib.is_binary_kernel(('layerA_0', 'GC', 'cov2', 'bias'), 1, False)
  np.testing.assert_equal(ops_count.count(model_lib.BHViT(**{**SMALL, 'weight_bits': 32}))
                          .params_binary, 0)
