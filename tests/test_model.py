"""BHViT at small size: every flag of docs/reference.md §1, calibration, validation."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bhvit_jax import model as model_lib

SMALL = dict(hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4),
             mlp_sizes=(32, 64, 128, 256), num_classes=5, image_size=32, window_size=1)

# A covering set of the flags: every value of every flag appears, in varied company.
FLAG_SETS = [
    dict(),
    dict(gsb=True, some_fp=False, recu=True, disable_layerscale=True, drop_path=0.2),
    dict(weight_bits=32, input_bits=32, norm='layer'),
    dict(weight_bits=32, input_bits=1, gsb=True, shift3=False, shift5=False, norm='layer'),
    dict(weight_bits=1, input_bits=32, shift5=False, recu=True, some_fp=False),
]


def _images(n=2, size=32):
  return jax.random.normal(jax.random.PRNGKey(0), (n, size, size, 3))


@pytest.mark.parametrize('flags', FLAG_SETS,
                         ids=lambda f: ','.join(f'{k}={v}' for k, v in f.items()) or 'published')
def test_flag_combinations_run_jitted_and_finite(flags):
  model = model_lib.BHViT(**SMALL, **flags)
  x = _images()
  variables = jax.jit(model.init)({'params': jax.random.PRNGKey(1)}, x)
  has_quant_state = not flags.get('gsb') and flags.get('input_bits', 1) == 1
  assert ('quant_state' in variables) == has_quant_state

  @jax.jit
  def run(variables):
    variables, _ = model_lib.calibrate(model, variables, x)

    def loss(p):
      logits, upd = model.apply({**variables, 'params': p}, x, train=True,
                                mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(2)})
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits
    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
    return value, logits, grads, model.apply(variables, x)

  value, logits, grads, eval_logits = run(variables)
  assert logits.shape == eval_logits.shape == (2, 5)
  assert np.isfinite(value) and np.all(np.isfinite(eval_logits))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert sum(float(jnp.sum(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads)) > 0.9 * len(
      jax.tree.leaves(grads)), 'most parameters should receive a gradient'


def test_published_parameter_counts():
  for depths, expected in (((2, 2, 6, 2), 13_779_960), ((3, 4, 8, 4), 22_642_920)):
    model = model_lib.BHViT(depths=depths)
    shapes = jax.eval_shape(lambda m=model: m.init({'params': jax.random.PRNGKey(0)},
                                                   jnp.zeros((1, 224, 224, 3))))
    assert sum(v.size for v in jax.tree.leaves(shapes['params'])) == expected


def test_calibration_sets_alpha_from_key_count():
  model = model_lib.BHViT(**SMALL)
  x = _images()
  variables = jax.jit(model.init)({'params': jax.random.PRNGKey(1)}, x)
  calibrate = jax.jit(model_lib.calibrate, static_argnums=0)  # op by op it takes 4x longer
  calibrated, logits = calibrate(model, variables, x)
  assert logits.shape == (2, 5)
  # stage 3: 1 window token + 4 global tokens; stage 4: 1 + 1 (P sums to 1 over keys).
  for block, nk, heads in (('layerB_0', 5, 2), ('layerB_1', 2, 4)):
    quant = calibrated['params'][block]['attention']['attention']['att_prob_quantizer']
    np.testing.assert_allclose(quant['alpha'], [2 * math.sqrt(3) / nk] * heads, rtol=1e-5)
    assert np.all(np.asarray(quant['zero_point']) > 0)  # 0.1 · min(3P), P > 0
    state = calibrated['quant_state'][block]['attention']['attention']['att_prob_quantizer']
    assert float(state['init_state'][0]) == 1.0
  # A second calibration leaves calibrated quantizers alone (the reference's init_state).
  again, _ = calibrate(model, calibrated, x * 3)
  chex.assert_trees_all_equal(again['params'], calibrated['params'])


def test_drop_path_only_in_training():
  model = model_lib.BHViT(**SMALL, gsb=True, drop_path=0.5)
  x = _images(8)
  variables = jax.jit(model.init)({'params': jax.random.PRNGKey(1)}, x)
  run = jax.jit(lambda seed: model.apply(variables, x, train=True, mutable=['batch_stats'],
                                         rngs={'dropout': jax.random.PRNGKey(seed)})[0])
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(3), run(3))
  evaluate = jax.jit(lambda: model.apply(variables, x))
  np.testing.assert_array_equal(evaluate(), evaluate())


@pytest.mark.parametrize('change,message', [
    (dict(mlp_sizes=(40, 64, 128, 256)), 'not an integer multiple'),
    (dict(hidden_sizes=(16, 32, 48, 128)), 'twice'),
    (dict(num_heads=(1, 1, 3, 4)), 'does not divide'),
    (dict(window_size=2), 'must be odd'),
    (dict(image_size=48), 'divisible by patch_size*8'),
    (dict(image_size=64, window_size=3), 'divisible by window_size=3'),
    (dict(depths=(1, 1, 1)), '4 entries'),
    (dict(norm='group'), "norm='group'"),
    (dict(remat_stages=(0, 2)), 'stage numbers 1-4'),
    (dict(fast_paths='gpu'), "fast_paths='gpu' must be one of"),
])
def test_invalid_configurations_are_named(change, message):
  with pytest.raises(ValueError, match=message.replace('*', r'\*').replace('(', r'\(')):
    model_lib.validate(model_lib.BHViT(**{**SMALL, **change}))


def test_from_config_rejects_unknown_keys_with_suggestion():
  with pytest.raises(ValueError, match='hidden_size .*did you mean hidden_sizes'):
    model_lib.from_config({**SMALL, 'hidden_size': (1, 2, 3, 4)})


def test_wrong_input_shape_is_named():
  model = model_lib.BHViT(**SMALL)
  with pytest.raises(ValueError, match=r'expected images \[B, 32, 32, 3\]'):
    model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 3, 32, 32)))
