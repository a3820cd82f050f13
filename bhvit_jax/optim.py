"""Optimizer of the BHViT recipe: one optax chain (clip → β·∂R/∂W → Adam → decay → lr →
layer-wise lr decay, for fine-tuning)."""
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from bhvit_jax import config_lib
from bhvit_jax import losses
from bhvit_jax import model as model_lib

PyTree = Any
Schedule = Callable[[jnp.ndarray], jnp.ndarray]


class OscillationRegState(NamedTuple):
  count: jnp.ndarray  # int32 scalar: number of updates seen


def add_oscillation_regularization(beta_schedule: Union[float, Schedule],
                                   mask: Union[PyTree, Callable[[PyTree], PyTree], None] = None
                                   ) -> optax.GradientTransformation:
  """Adds β(step)·∂R/∂W to the gradients, R = `losses.oscillation_regularizer`.

  Placed before Adam's moments this is the same update as Adam on ∇(loss + β·R).

  Args:
    beta_schedule: constant β or a function of the update count.
    mask: bool pytree (or function params → pytree) selecting the regularized kernels;
      default `losses.regularizer_mask`.
  """
  beta_fn = beta_schedule if callable(beta_schedule) else (lambda _: beta_schedule)

  def init_fn(params):
    del params
    return OscillationRegState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('add_oscillation_regularization needs params: call tx.update(g, s, params).')
    layer_mask = mask(params) if callable(mask) else mask
    reg_grads = jax.grad(losses.oscillation_regularizer)(params, layer_mask)
    beta = jnp.asarray(beta_fn(state.count))
    updates = jax.tree_util.tree_map(lambda g, r: g + (beta * r).astype(g.dtype), updates,
                                     reg_grads)
    return updates, OscillationRegState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for parameters that decay: rank ≥ 2 and not a position embedding.

  Rank < 2 covers biases, norm scales, RPReLU/LayerScale vectors and the gsb scalars.
  """
  def decays(path, leaf):
    return jnp.ndim(leaf) >= 2 and 'position_embeddings' not in model_lib.path_names(path)
  return jax.tree_util.tree_map_with_path(decays, params)


def _block_order(name: str):
  """Sort key of a block module name (`layerA_i` before `layerB_j`), None for other modules."""
  kind, _, index = name.partition('_')
  return (kind, int(index)) if kind in ('layerA', 'layerB') and index.isdigit() else None


def layer_depths(params: PyTree) -> dict:
  """{top-level module name: depth} of a BHViT params tree, counted from the input.

  The stem (`embeddings`) is 0, the blocks 1..N in order, and a downsampling (`patch_embedK`)
  shares the depth of the first block of the stage it feeds (the blocks of its width);
  the final norm and the classifier are N + 1.
  """
  blocks = sorted((n for n in params if _block_order(n)), key=_block_order)
  depths = {name: i + 1 for i, name in enumerate(blocks)}
  first_of_width = {}
  for name in blocks:
    first_of_width.setdefault(jnp.shape(params[name]['layernorm_before']['scale'])[0],
                              depths[name])
  for name, tree in params.items():
    if name == 'embeddings':
      depths[name] = 0
    elif name.startswith('patch_embed'):
      depths[name] = first_of_width[tree['position_embeddings'].shape[-1]]
    else:
      depths.setdefault(name, len(blocks) + 1)
  return depths


def layer_decay_factors(params: PyTree, decay: float) -> PyTree:
  """Per-leaf lr factor decay^(N + 1 − depth) (`layer_depths`): 1 for the head, decay^(N+1)
  for the stem, as BEiT/timm's layer-wise lr decay."""
  depths = layer_depths(params)
  top = max(depths.values())
  return {name: jax.tree_util.tree_map(lambda _, d=depths[name]: decay ** (top - d), tree)
          for name, tree in params.items()}


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its module's `layer_decay_factors` (stateless)."""
  def update_fn(updates, state, params=None):
    del params
    factors = layer_decay_factors(updates, decay)
    return jax.tree_util.tree_map(lambda u, f: u * jnp.asarray(f, u.dtype), updates,
                                  factors), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def scaled_base_lr(optim_config, global_batch_size: int) -> float:
  """base_lr · global_batch / lr_batch_scale (the linear scaling rule of the run script)."""
  return optim_config.base_lr * global_batch_size / optim_config.lr_batch_scale


def cosine_epoch_schedule(base_lr: float, min_lr: float, num_epochs: int,
                          steps_per_epoch: int) -> Schedule:
  """The reference's per-epoch cosine: epochs 0 and 1 use base_lr, epoch e ≥ 1 cosine(e − 1)."""
  if num_epochs <= 0 or steps_per_epoch <= 0:
    raise config_lib.UserError(f'cosine_epoch needs num_epochs > 0 and steps_per_epoch > 0, '
                               f'got {num_epochs} and {steps_per_epoch}.')

  def schedule(step):
    epoch = jnp.maximum(step // steps_per_epoch - 1, 0)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / num_epochs))
    return min_lr + (base_lr - min_lr) * cosine
  return schedule


def learning_rate_schedule(optim_config, *, global_batch_size: int, total_steps: int,
                           steps_per_epoch: int = 0) -> Schedule:
  """'constant' | 'cosine' (step-wise, optional linear warm-up) | 'cosine_epoch'."""
  base_lr = scaled_base_lr(optim_config, global_batch_size)
  kind = optim_config.schedule
  if kind == 'constant':
    return optax.constant_schedule(base_lr)
  if kind == 'cosine':
    warmup = optim_config.warmup_steps
    if total_steps <= warmup:
      raise config_lib.UserError(f'cosine schedule: total_steps={total_steps} must exceed '
                                 f'warmup_steps={warmup}.')
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else base_lr, peak_value=base_lr, warmup_steps=warmup,
        decay_steps=total_steps, end_value=optim_config.min_lr)
  if kind == 'cosine_epoch':
    num_epochs = -(-total_steps // steps_per_epoch) if steps_per_epoch else 0
    return cosine_epoch_schedule(base_lr, optim_config.min_lr, num_epochs, steps_per_epoch)
  raise config_lib.UserError(f"Unknown optim.schedule {kind!r}; expected 'constant', "
                             "'cosine' or 'cosine_epoch'.")


def beta_schedule(optim_config, total_steps: int) -> Schedule:
  """β of the regularizer: 0 before reg_start_fraction·total_steps, reg_beta after."""
  start = int(round(optim_config.reg_start_fraction * total_steps))
  beta = optim_config.reg_beta
  return lambda step: jnp.where(step >= start, beta, 0.0)


def build_optimizer(optim_config, *, global_batch_size: int, total_steps: int,
                    steps_per_epoch: int = 0, reg_in_optimizer: bool = True):
  """The whole chain of the recipe.

  Args:
    optim_config: the `config.optim` ConfigDict of the shared schema.
    global_batch_size: for the linear lr scaling rule.
    total_steps: length of the run (schedules, regularizer start).
    steps_per_epoch: needed by 'cosine_epoch'.
    reg_in_optimizer: False when the training loss carries β·R itself.
  Returns:
    (optax.GradientTransformation, lr schedule, β schedule).
  """
  lr = learning_rate_schedule(optim_config, global_batch_size=global_batch_size,
                              total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  beta = beta_schedule(optim_config, total_steps)
  parts = []
  if optim_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  if reg_in_optimizer and optim_config.reg_beta:
    parts.append(add_oscillation_regularization(beta, losses.regularizer_mask))
  parts.append(optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps))
  if optim_config.weight_decay:
    parts.append(optax.add_decayed_weights(optim_config.weight_decay, mask=weight_decay_mask))
  parts.append(optax.scale_by_learning_rate(lr))
  layer_decay = optim_config.get('layer_decay', 1.0)
  if layer_decay != 1.0:
    parts.append(scale_by_layer_decay(layer_decay))
  return optax.chain(*parts), lr, beta
