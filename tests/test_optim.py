"""The optimizer chain: regularizer placement, AdamW semantics, schedules."""
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bhvit_jax import losses
from bhvit_jax import optim


def _optim_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      base_lr=1e-2, lr_batch_scale=512, schedule='constant', warmup_steps=0, min_lr=1e-8,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, reg_beta=0.1,
      reg_start_fraction=0.0))
  config.update(overrides)
  return config


def _problem():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {'block': {'dense': {'kernel': jax.random.normal(keys[0], (4, 3)) * 1.5},
                      'cov2': {'kernel': jax.random.normal(keys[1], (3, 3, 1, 4))}},
            'classifier': {'kernel': jax.random.normal(keys[2], (3, 2)), 'bias': jnp.zeros(2)}}
  x = jax.random.normal(keys[3], (5, 4))

  def loss_fn(p):
    h = jnp.tanh(x @ p['block']['dense']['kernel'] + p['block']['cov2']['kernel'].sum())
    return jnp.mean((h @ p['classifier']['kernel'] + p['classifier']['bias']) ** 2)
  return params, loss_fn


def _run(tx, params, grad_fn, steps=3):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_regularizer_transform_equals_adam_on_regularized_loss():
  params, loss_fn = _problem()
  beta, lr = 0.1, 1e-2
  chained = optax.chain(optim.add_oscillation_regularization(beta, losses.regularizer_mask),
                        optax.scale_by_adam(), optax.scale(-lr))
  got = _run(chained, params, jax.grad(loss_fn))
  regularized = lambda p: loss_fn(p) + beta * losses.oscillation_regularizer(p)
  want = _run(optax.adam(lr), params, jax.grad(regularized))
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), got, params)
  assert min(jax.tree_util.tree_leaves(moved)) > 0


def test_build_optimizer_matches_torch_adamw():
  torch = pytest.importorskip('torch')
  params, loss_fn = _problem()
  config = _optim_config(base_lr=512 * 1e-2, weight_decay=0.05)
  tx, _, _ = optim.build_optimizer(config, global_batch_size=1, total_steps=10)
  got = _run(tx, params, jax.grad(loss_fn))  # the chain adds 0.1·∂R/∂W itself

  regularized = lambda p: loss_fn(p) + 0.1 * losses.oscillation_regularizer(p)
  flat, treedef = jax.tree_util.tree_flatten(params)
  decay = jax.tree_util.tree_leaves(optim.weight_decay_mask(params))
  tensors = [torch.tensor(np.asarray(p), dtype=torch.float64, requires_grad=True) for p in flat]
  groups = [{'params': [t for t, d in zip(tensors, decay) if d], 'weight_decay': 0.05},
            {'params': [t for t, d in zip(tensors, decay) if not d], 'weight_decay': 0.0}]
  opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
  for _ in range(3):
    current = jax.tree_util.tree_unflatten(treedef, [t.detach().numpy() for t in tensors])
    grads = jax.tree_util.tree_leaves(jax.grad(regularized)(current))
    for t, g in zip(tensors, grads):
      t.grad = torch.tensor(np.asarray(g), dtype=torch.float64)
    opt.step()
  want = [t.detach().numpy() for t in tensors]
  for a, b in zip(jax.tree_util.tree_leaves(got), want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_weight_decay_mask():
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'norm': {'scale': jnp.ones(2)}, 'embeddings': {'position_embeddings': jnp.ones((1, 4, 2))},
            'att_prob_clip': jnp.ones(())}
  mask = optim.weight_decay_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False},
                  'embeddings': {'position_embeddings': False}, 'att_prob_clip': False}


def test_cosine_epoch_schedule_values():
  base, low, epochs, per_epoch = 1e-3, 1e-8, 10, 7
  config = _optim_config(base_lr=base * 512 / 256, schedule='cosine_epoch', min_lr=low)
  lr = optim.learning_rate_schedule(config, global_batch_size=256, total_steps=epochs * per_epoch,
                                    steps_per_epoch=per_epoch)
  cosine = lambda e: low + 0.5 * (base - low) * (1 + math.cos(math.pi * e / epochs))
  for step, want in [(0, base), (per_epoch - 1, base), (per_epoch, base),
                     (2 * per_epoch, cosine(1)), (2 * per_epoch + 6, cosine(1)),
                     ((epochs - 1) * per_epoch, cosine(epochs - 2)),
                     (epochs * per_epoch - 1, cosine(epochs - 2))]:
    np.testing.assert_allclose(lr(step), want, rtol=1e-6, err_msg=f'step {step}')


def test_cosine_with_warmup_and_constant():
  config = _optim_config(base_lr=512.0, schedule='cosine', warmup_steps=10, min_lr=0.0)
  lr = optim.learning_rate_schedule(config, global_batch_size=1, total_steps=110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)], [0, 0.5, 1, 0.5, 0],
                             atol=1e-6)
  constant = optim.learning_rate_schedule(_optim_config(base_lr=1.0), global_batch_size=1024,
                                          total_steps=5)
  np.testing.assert_allclose(constant(3), 2.0)
  with pytest.raises(ValueError, match='Unknown optim.schedule'):
    optim.learning_rate_schedule(_optim_config(schedule='linear'), global_batch_size=1,
                                 total_steps=5)


def test_beta_schedule_starts_at_fraction():
  beta = optim.beta_schedule(_optim_config(reg_beta=0.1, reg_start_fraction=0.9), total_steps=100)
  np.testing.assert_allclose([beta(0), beta(89), beta(90), beta(99)], [0, 0, 0.1, 0.1])


def test_layer_decay_scales_each_update_by_its_depth_factor():
  from bhvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  model = model_lib.BHViT(hidden_sizes=(8, 16, 32, 64), depths=(2, 1, 2, 1),
                          num_heads=(1, 1, 2, 4), mlp_sizes=(16, 32, 64, 128), num_classes=3,
                          image_size=32, window_size=1)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), shapes['params'])
  grads = jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape, np.float32), params)
  # Six blocks: depth 0 stem, 1-6 blocks, 7 head; a downsampling with its stage's first block.
  depth = {'embeddings': 0, 'layerA_0': 1, 'layerA_1': 2, 'patch_embed1': 3, 'layerA_2': 3,
           'patch_embed2': 4, 'layerB_0': 4, 'layerB_1': 5, 'patch_embed3': 6, 'layerB_2': 6,
           'layernorm': 7, 'classifier': 7}
  assert set(depth) == set(params)

  def updates(layer_decay):
    config = _optim_config(weight_decay=0.05, reg_beta=0.0, layer_decay=layer_decay)
    tx, _, _ = optim.build_optimizer(config, global_batch_size=512, total_steps=10)
    return tx.update(grads, tx.init(params), params)[0]
  plain, decayed = jax.jit(lambda: (updates(1.0), updates(0.5)))()
  for name, d in depth.items():
    for a, b in zip(jax.tree_util.tree_leaves(decayed[name]),
                    jax.tree_util.tree_leaves(plain[name])):
      assert float(jnp.abs(b).max()) > 0
      np.testing.assert_allclose(a, b * 0.5 ** (7 - d), rtol=1e-6, err_msg=name)
