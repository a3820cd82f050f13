r"""Trains BHViT: `python -m bhvit_jax.train --config configs/demo.py --workdir runs/demo`.

Restarting the same command resumes from the newest checkpoint in WORKDIR/checkpoints (bitwise
the same result as an uninterrupted run on CPU: the data order, dropout keys and optimizer
state are all functions of the step). Writes WORKDIR/metrics.jsonl, TensorBoard events in
WORKDIR/tb and WORKDIR/training.png.

Reusable pieces: `build_train_step` (a config's step as the loop runs it), `create_train_state`,
`make_train_step`, `make_eval_step`, `evaluate`. The command line is `bhvit_jax.main`.
"""
import dataclasses
import functools
import itertools
import logging
import os
import signal
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import config_lib
from bhvit_jax import data as data_lib
from bhvit_jax import hostmem
from bhvit_jax import losses
from bhvit_jax import metrics as metrics_lib
from bhvit_jax import model as model_lib
from bhvit_jax import optim
from bhvit_jax import plots
from bhvit_jax import quantizers
from bhvit_jax import run_identity
from bhvit_jax import sharding as sharding_lib
from bhvit_jax import teachers

PyTree = Any


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a NaN/Inf loss, gradient or update."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree; checkpointed whole)."""
  step: jnp.ndarray  # int32 scalar: steps taken, skipped non-finite ones included
  params: PyTree
  batch_stats: PyTree
  quant_state: PyTree
  opt_state: PyTree
  nonfinite_in_row: jnp.ndarray  # int32 scalar
  nonfinite_total: jnp.ndarray  # int32 scalar
  # Exponential moving averages of params and BatchNorm statistics; {} when config.ema_decay
  # is 0 (see `ema_update`). The statistics are averaged rather than copied, as timm's
  # ModelEma (the official --model-ema) averages buffers: the live statistics describe the
  # live weights' activations, not the average's.
  ema_params: PyTree = flax.struct.field(default_factory=dict)
  ema_batch_stats: PyTree = flax.struct.field(default_factory=dict)

  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats,
            'quant_state': self.quant_state}

  def weights(self) -> dict:
    """The variables and EMA (what evaluation and export need; no optimizer state)."""
    return {k: v for k, v in {**self.variables(), 'ema_params': self.ema_params,
                              'ema_batch_stats': self.ema_batch_stats}.items() if v}

  def ema_state(self) -> 'TrainState':
    """This state with the EMA weights and statistics in place of the live ones (for eval)."""
    return self.replace(params=self.ema_params, batch_stats=self.ema_batch_stats)


def create_train_state(variables: dict, tx: optax.GradientTransformation,
                       ema: bool = False) -> TrainState:
  """TrainState at step 0 from model variables ({'params', 'batch_stats'?, 'quant_state'?});
  `ema`: start the weight average at these variables."""
  params = variables['params']
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
  state = TrainState(step=zero(), params=params, batch_stats=variables.get('batch_stats', {}),
                     quant_state=variables.get('quant_state', {}), opt_state=tx.init(params),
                     nonfinite_in_row=zero(), nonfinite_total=zero())
  return reset_ema(state) if ema else state


def reset_ema(state: TrainState) -> TrainState:
  """`state` with its EMA set to (copies of) the live params and BatchNorm statistics."""
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # own buffers: donated
  return state.replace(ema_params=copy(state.params), ema_batch_stats=copy(state.batch_stats))


def ema_update(ema: PyTree, new: PyTree, decay: float) -> PyTree:
  """decay·ema + (1 − decay)·new, leaf by leaf (timm's ModelEma, which the official
  `--model-ema` uses)."""
  return jax.tree_util.tree_map(
      lambda e, n: (decay * e + (1.0 - decay) * n).astype(e.dtype), ema, new)


def accumulate_gradients(loss_and_grads: Callable, params, batch_stats, images, labels, rng,
                         steps: int):
  """`loss_and_grads(params, batch_stats, images, labels, rng)` over `steps` micro-batches.

  `loss_and_grads` returns ((loss, (logits, new batch_stats, parts)), grads) of one batch;
  this returns the same for the whole batch: loss, parts and gradients are the means over the
  micro-batches (each the mean over its examples, so the whole batch's mean), logits in the
  batch's row order, BatchNorm statistics updated once per micro-batch in turn (as that many
  smaller steps of PyTorch would). Micro-batch j holds rows j, j + steps, j + 2·steps, ...,
  so a batch sharded in row blocks keeps every micro-batch spread over all devices. Dropout
  keys are `rng` folded with j. `steps == 1` calls `loss_and_grads` once with `rng` itself.
  """
  if steps == 1:
    return loss_and_grads(params, batch_stats, images, labels, rng)
  if images.shape[0] % steps:
    raise config_lib.UserError(f'the batch of {images.shape[0]} is not divisible by '
                               f'grad_accum_steps={steps}')
  split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)

  def micro_step(carry, micro):
    grad_sum, stats = carry
    index, micro_images, micro_labels = micro
    (loss, (logits, stats, parts)), grads = loss_and_grads(
        params, stats, micro_images, micro_labels, jax.random.fold_in(rng, index))
    grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
    return (grad_sum, stats), (loss, logits, parts)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  (grad_sum, batch_stats), (loss, logits, parts) = jax.lax.scan(
      micro_step, (zeros, batch_stats), (jnp.arange(steps), split(images), split(labels)))
  mean = lambda tree: jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), tree)
  logits = jnp.swapaxes(logits, 0, 1).reshape(-1, logits.shape[-1])  # back to row order
  grads = jax.tree_util.tree_map(lambda g: g / steps, grad_sum)
  return (jnp.mean(loss), (logits, batch_stats, mean(parts))), grads


def sign_flip_rate(old_params: PyTree, new_params: PyTree, mask: PyTree):
  """Fraction of binarized weights whose binary value's sign changed (0 when none)."""
  flips, total = jnp.zeros((), jnp.float32), 0
  for old, new, m in zip(jax.tree_util.tree_leaves(old_params),
                         jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(mask)):
    if m:
      flips += jnp.sum(quantizers.weight_signs(old) != quantizers.weight_signs(new))
      total += old.size
  return flips / max(total, 1)


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(model, tx: optax.GradientTransformation, *, loss_config,
                    lr_fn: Callable, beta_fn: Callable, reg_in_loss: bool = False,
                    teacher_model=None, ema_decay: float = 0.0,
                    grad_accum_steps: int = 1) -> Callable:
  """Builds the pure `train_step(state, batch, rng[, teacher_variables]) -> (state, metrics)`.

  `batch` is {'image': [B, H, W, 3] float, 'label': [B] int, 'target'?: [B, K] soft targets
  of mixup/cutmix}; `rng` is the run's base key, folded with the step so dropout keys depend
  only on (seed, step). A step whose loss, gradients, new params, statistics or optimizer
  state are not finite leaves all of them (and the EMA) unchanged. The schedules (lr, β)
  follow the applied updates, `step - nonfinite_total`: a skipped step leaves the optimizer's
  counts where they were, so the loss's β and the logged lr and β are the ones the optimizer
  applies. `ema_decay` > 0 updates the state's EMA after every applied step (`ema_update`);
  `grad_accum_steps` > 1 splits the batch into that many micro-batches whose gradients are
  averaged into one optimizer update (`accumulate_gradients`). Non-gsb attention quantizers
  must be calibrated first (`model.calibrate`, as the training loop does on its first batch):
  the step refuses never-calibrated ones rather than train them uncalibrated.
  """
  def loss_and_grads(params, batch_stats, images, targets, dropout_rng, quant_state, applied,
                     teacher_variables):
    teacher_logits = None
    if teacher_model is not None:
      teacher_logits = jax.lax.stop_gradient(
          teacher_model.apply(teacher_variables, images, train=False)).astype(jnp.float32)

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': batch_stats}
      if quant_state:
        variables['quant_state'] = quant_state
      logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': dropout_rng})
      loss, parts = losses.total_loss(
          logits, targets, teacher_logits, label_smoothing=loss_config.label_smoothing,
          ce_weight=loss_config.ce_weight, distill_weight=loss_config.distill_weight)
      if reg_in_loss:
        loss = loss + beta_fn(applied) * losses.oscillation_regularizer(params)
      return loss, (logits, updates.get('batch_stats', {}), parts)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def train_step(state: TrainState, batch, rng, teacher_variables=None):
    if state.quant_state:
      _refuse_uncalibrated(state.quant_state)
    images, labels = batch['image'], batch['label']
    dropout_rng = jax.random.fold_in(rng, state.step)
    applied = state.step - state.nonfinite_total  # == the optimizer's update count
    (loss, (logits, batch_stats, parts)), grads = accumulate_gradients(
        functools.partial(loss_and_grads, quant_state=state.quant_state, applied=applied,
                          teacher_variables=teacher_variables),
        state.params, state.batch_stats, images, batch.get('target', labels), dropout_rng,
        grad_accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A NaN lr or a bad optimizer state passes the loss and gradients: check what is kept.
    finite = (jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
              & _all_finite(batch_stats) & _all_finite(opt_state))
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    in_row = jnp.where(finite, 0, state.nonfinite_in_row + 1)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state), nonfinite_in_row=in_row,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    if ema_decay:
      new_state = new_state.replace(
          ema_params=keep(ema_update(state.ema_params, new_state.params, ema_decay),
                          state.ema_params),
          ema_batch_stats=keep(ema_update(state.ema_batch_stats, new_state.batch_stats,
                                          ema_decay), state.ema_batch_stats))
    metrics = {
        'step': state.step, 'loss': loss, 'ce': parts['ce'], 'kd': parts['kd'],
        'reg': losses.oscillation_regularizer(state.params), 'lr': lr_fn(applied),
        'beta': jnp.asarray(beta_fn(applied), jnp.float32),
        'train_top1': jnp.mean(jnp.argmax(logits, -1) == labels),
        'sign_flip_rate': sign_flip_rate(state.params, new_state.params,
                                         model_lib.binary_kernel_mask(state.params, model)),
        'grad_norm': optax.tree.norm(grads), 'finite': finite,
        'nonfinite_in_row': in_row, 'nonfinite_total': new_state.nonfinite_total}
    return new_state, metrics

  return train_step


@dataclasses.dataclass
class Recipe:
  """What a config's training needs besides data: the model, optimizer, schedules, teacher and
  the pure (unjitted) train step."""
  model: Any
  tx: optax.GradientTransformation
  lr_fn: Callable
  beta_fn: Callable
  teacher_model: Any
  teacher_variables: Optional[PyTree]
  train_step: Callable


def build_train_step(config, *, total_steps: int, steps_per_epoch: int,
                     global_batch_size: Optional[int] = None) -> Recipe:
  """The train step of `config` exactly as the training loop runs it (for the loop, the
  benchmark and cross-framework checks)."""
  model = model_lib.build(config.model, config.compute_dtype)
  reg_in_loss = config.optim.get('reg_placement', 'optimizer') == 'loss'
  tx, lr_fn, beta_fn = optim.build_optimizer(
      config.optim, global_batch_size=global_batch_size or config.batch_size,
      total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      reg_in_optimizer=not reg_in_loss)
  teacher_model, teacher_variables = teachers.build(config)
  step = make_train_step(model, tx, loss_config=config.loss, lr_fn=lr_fn, beta_fn=beta_fn,
                         reg_in_loss=reg_in_loss, teacher_model=teacher_model,
                         **research_options(config))
  return Recipe(model, tx, lr_fn, beta_fn, teacher_model, teacher_variables, step)


def research_options(config) -> dict:
  """make_train_step's `ema_decay` and `grad_accum_steps` of `config`, checked."""
  decay, accum = float(config.get('ema_decay', 0.0)), int(config.get('grad_accum_steps', 1))
  if not 0.0 <= decay < 1.0:
    raise config_lib.UserError(f'config.ema_decay={decay} must be in [0, 1) (0: no EMA)')
  if accum < 1 or config.batch_size % accum:
    raise config_lib.UserError(f'config.grad_accum_steps={accum} must be >= 1 and divide '
                               f'batch_size={config.batch_size}')
  return {'ema_decay': decay, 'grad_accum_steps': accum}


def make_eval_logits(model) -> Callable:
  """`eval_logits(state, images) -> logits` of the eval-mode model."""

  def eval_logits(state: TrainState, images):
    variables = {k: v for k, v in state.variables().items() if v}
    return model.apply(variables, images, train=False)
  return eval_logits
def _refuse_uncalibrated(quant_state):
  """Raises UserError when a quantizer flag is 0 (checked on the host inside a jit)."""
  def check(*flags_):
    if not model_lib.is_calibrated(flags_):
      raise config_lib.UserError(
          'the train step got uncalibrated attention quantizers (quant_state init_state = 0): '
          'run model.calibrate(model, variables, first_images) before create_train_state, as '
          'the reference calibrates them on its first training batch')
  leaves = jax.tree_util.tree_leaves(quant_state)
  if any(isinstance(f, jax.core.Tracer) for f in leaves):
    jax.debug.callback(check, *leaves)
  else:
    check(*leaves)


def make_eval_step(model) -> Callable:
  """`eval_step(state, batch) -> eval_sums` of the eval-mode model."""
  eval_logits = make_eval_logits(model)

  def eval_step(state: TrainState, batch):
    return eval_sums(eval_logits(state, batch['image']), batch)
  return eval_step


def eval_sums(logits, batch) -> dict:
  """Sums of top-1/top-5 correct predictions, CE and examples (mask-weighted) of one batch.

  Top-5 is top-min(5, classes).
  """
  logits = logits.astype(jnp.float32)
  mask = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32))
  log_probs = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(log_probs, batch['label'][:, None], axis=-1)[:, 0]
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  in_top5 = jnp.any(top5 == batch['label'][:, None], axis=-1)
  return {'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
          'correct5': jnp.sum(in_top5 * mask), 'loss': jnp.sum(nll * mask),
          'count': jnp.sum(mask)}


def evaluate(eval_step: Callable, state, batches) -> dict:
  """Top-1 and top-5 (%) and mean CE over one pass of `batches` (`state`: eval_step's first
  argument)."""
  totals = None
  for batch in batches:
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  if totals is None:
    raise config_lib.UserError('evaluation set is empty')
  totals = sharding_lib.fetch(totals)
  count = max(float(totals['count']), 1.0)
  return {'top1': 100.0 * float(totals['correct']) / count,
          'top5': 100.0 * float(totals['correct5']) / count,
          'loss': float(totals['loss']) / count, 'examples': int(totals['count'])}


def check_num_classes(config, model):
  """Raises UserError when the model's classifier does not match the config's data set."""
  classes = data_lib.num_classes(config)
  if classes != model.num_classes:
    raise config_lib.UserError(f'model.num_classes={model.num_classes} but data set '
                               f'{config.data.name!r} has {classes} classes')


def _needs_calibration(variables) -> bool:
  # As the reference: a quantizer calibrates on its first train forward iff its flag is 0.
  flags_ = jax.tree_util.tree_leaves(variables.get('quant_state', {}))
  return any(not bool(np.all(np.asarray(f))) for f in flags_)


# ------------------------------------------------------------ the loop ---


def _total_steps(config, steps_per_epoch: int) -> int:
  if config.get('total_steps'):
    return int(config.total_steps)
  if config.get('num_epochs'):
    return int(config.num_epochs) * steps_per_epoch
  raise config_lib.UserError('set config.total_steps or config.num_epochs')


class _StopRequest:
  """SIGTERM/SIGINT (or the platform's preemption notice) on any process, turned into one
  decision that every process takes at the same step or evaluation batch.

  `agreed()` is a collective where there are several processes (an all-reduce of the local
  flag): every process calls it at the same points. A second SIGINT interrupts at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False  # this process was asked to stop
    self.stopped = False  # every process agreed to stop
    self._previous = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('%s received: saving a checkpoint and exiting.',
                    signal.Signals(signum).name)
    self.requested = True
    if signum == signal.SIGINT:
      signal.signal(signum, self._previous[signum])

  def agreed(self, step: Optional[int] = None) -> bool:
    """True on every process once any process was asked to stop (sticky).

    `step`: at a training step the platform's preemption sync point is consulted too.
    """
    local = self.requested or (step is not None and sharding_lib.reached_preemption_point(step))
    self.stopped = self.stopped or sharding_lib.any_process(local)
    return self.stopped

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _stop_after(stop: _StopRequest, batches):
  """`batches` until the processes agree to stop (at least one: an evaluation is never
  empty)."""
  for batch in batches:
    yield batch
    if stop.agreed():
      return


def _resume(config, checkpoints, state, rng, block):
  """(state, rng, metrics history, train iterator) from the newest checkpoint, or fresh.

  `block` is (index, count) of this process's rows of the global batch. The restore is
  collective: every process calls it, with `state` already carrying its shardings.
  """
  read = functools.partial(data_lib.build_train_iter, config, process_index=block[0],
                           process_count=block[1])
  restored = checkpoints.restore({'train': state, 'rng': rng})
  if restored is None:
    return state, rng, [], read(start_step=0)
  step, tree, meta = restored
  if sharding_lib.is_primary():
    print(f'Resuming from {checkpoints.directory} at step {step}.')
  train_iter = read(start_step=step)
  train_iter.set_state(meta['data_state'])
  return tree['train'], tree['rng'], meta['history'], train_iter


def _calibrate(model, state: TrainState, images) -> TrainState:
  """The non-gsb quantizers' first-batch calibration (docs/reference.md §2) before the first step."""
  calibrated, _ = jax.jit(functools.partial(model_lib.calibrate, model))(
      state.variables(), images)
  state = state.replace(params=calibrated['params'], quant_state=calibrated['quant_state'])
  return reset_ema(state) if state.ema_params else state


def _periodic_eval_missing(config, history, step, total_steps) -> bool:
  """True when the periodic evaluation of `step` (the resumed one) has no record."""
  every = config.eval_every_steps
  if not every or step % every or not 0 < step < total_steps:
    return False
  return not any(r.get('kind') == 'eval' and r.get('step') == step for r in history)


def _nonfinite_error(step, in_row, limit, checkpoints) -> NonFiniteError:
  last = checkpoints.latest_step()
  where = os.path.join(checkpoints.directory, str(last)) if last is not None else 'none'
  return NonFiniteError(
      f'stopping at step {step}: {in_row} consecutive steps with non-finite loss, gradients or '
      f'update (max_nonfinite_in_row={limit}). Last good checkpoint: {where}. Lower the '
      'learning rate or set optim.grad_clip_norm, then restart.')


def train_and_evaluate(config, workdir: str, *, mesh=None,
                       should_stop: Optional[Callable[[int], bool]] = None):
  """Runs (or resumes) training and a final evaluation.

  Args:
    config: the shared ml_collections schema.
    workdir: checkpoints, metrics.jsonl, tb/ and training.png go here.
    mesh: optional jax Mesh with axes ('data', 'fsdp') (see `sharding`); default the one of
      config.mesh over all devices of all processes (started by `initialize_distributed`).
    should_stop: optional `f(step) -> bool` checked after each step; when true the loop saves
      a checkpoint and returns early, as on SIGTERM (on any process: all stop together).
  Returns:
    (final TrainState, summary dict with 'top1' (None when stopped early), 'step', 'plot').
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  sharding_lib.initialize_distributed(config)
  mesh = mesh or sharding_lib.make_mesh(config.get('mesh') or {})
  block = sharding_lib.process_batch_block(mesh, config.batch_size)
  eval_block = sharding_lib.process_batch_block(
      mesh, config.get('eval_batch_size') or config.batch_size)
  primary = sharding_lib.is_primary()
  os.makedirs(workdir, exist_ok=True)
  checkpoints = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                      config.checkpoint_every_steps, config.keep_checkpoints)
  changes = run_identity.check(config, workdir, resuming_from=checkpoints.latest_step())
  steps_per_epoch = max(data_lib.num_train_examples(config) // config.batch_size, 1)
  total_steps = _total_steps(config, steps_per_epoch)
  recipe = build_train_step(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  model, tx = recipe.model, recipe.tx
  check_num_classes(config, model)
  teacher_variables = recipe.teacher_variables
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  variables = model_lib.init_variables(model, init_rng)
  if config.get('init_from'):
    variables = ckpt_lib.load_any(config.init_from, model, variables, adapt=True)
  state = create_train_state(variables, tx, ema=bool(config.get('ema_decay')))
  state_shardings = sharding_lib.tree_shardings(mesh, state)
  teacher_shardings = sharding_lib.tree_shardings(mesh, teacher_variables)
  replicated, batch_sharding = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
  state, teacher_variables, step_rng = sharding_lib.put(
      (state, teacher_variables, step_rng), (state_shardings, teacher_shardings, replicated))

  state, step_rng, history, train_iter = _resume(config, checkpoints, state, step_rng, block)
  run_identity.record(config, workdir, mesh, changes)
  start_step = int(sharding_lib.fetch(state.step))

  train_step = sharding_lib.jit_train_step(recipe.train_step, mesh, state_shardings,
                                          teacher_shardings)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings, batch_sharding),
                      out_shardings=replicated)
  put_batch = functools.partial(sharding_lib.global_batch, mesh)
  eval_batches = lambda: map(put_batch, data_lib.build_eval_iter(
      config, split=data_lib.selection_split(config), process_index=eval_block[0],
      process_count=eval_block[1]))
  writer = metrics_lib.MetricsWriter(workdir, history, active=primary)
  best = ckpt_lib.BestCheckpoint(os.path.join(workdir, ckpt_lib.BEST_DIR),
                                 enabled=config.get('keep_best_checkpoint', True))

  def evaluate_unless_stopped(stop):
    """The eval record, written; None when a stop cut the evaluation short (not written)."""
    result = evaluate(eval_step, state, _stop_after(stop, eval_batches()))
    ema_result = state.ema_params and evaluate(eval_step, state.ema_state(),
                                               _stop_after(stop, eval_batches()))
    if stop.stopped:
      return None
    writer.write({'kind': 'eval', 'step': int(state.step), **result})
    if ema_result:
      writer.write({'kind': 'eval_ema', 'step': int(state.step), **ema_result})
    best.update(int(state.step), result['top1'], state.weights())
    return result

  def save():
    if checkpoints.latest_step() == int(state.step):
      return  # a rerun of a finished run: that checkpoint exists already
    meta = {'data_state': train_iter.get_state(), 'history': writer.history,
            'total_steps': total_steps}
    checkpoints.save(int(state.step), {'train': state, 'rng': step_rng}, meta, force=True)

  batches = iter(train_iter)
  if start_step == 0 and _needs_calibration(state.variables()):
    first = next(batches)
    batches = itertools.chain([first], batches)
    state = jax.device_put(_calibrate(model, state, put_batch(first)['image']), state_shardings)

  interval, last_log = [], time.time()
  log_every = max(int(config.log_every_steps), 1)
  with _StopRequest() as stop, tqdm(total=total_steps, initial=start_step, disable=not primary,
                                    dynamic_ncols=True, mininterval=2.0) as bar:
    if _periodic_eval_missing(config, history, start_step, total_steps):
      evaluate_unless_stopped(stop)  # a stop had cut it short in the run that saved `state`
    for step in range(start_step, total_steps):
      if stop.stopped:
        break
      batch = put_batch(next(batches))
      state, metrics = train_step(state, batch, step_rng, teacher_variables)
      if step == start_step:
        hostmem.release_host_memory()  # after the first call, which compiled the step
      interval.append(metrics)
      done = step + 1
      in_row = int(metrics['nonfinite_in_row'])
      if not bool(metrics['finite']):
        logging.warning('step %d: non-finite loss, gradients or update; skipped (%d in a row)',
                        step, in_row)
      if in_row >= config.max_nonfinite_in_row:
        writer.write({'kind': 'train', 'step': done, **metrics_lib.summarize(interval)})
        checkpoints.wait()
        raise _nonfinite_error(step, in_row, config.max_nonfinite_in_row, checkpoints)
      if done % log_every == 0 or done == total_steps:
        now = time.time()
        record = {'kind': 'train', 'step': done, **metrics_lib.summarize(interval),
                  'images_per_sec': len(interval) * config.batch_size / (now - last_log)}
        writer.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", top1=f"{record['train_top1']:.1f}",
                        img_s=f"{record['images_per_sec']:.0f}")
        interval, last_log = [], now
      if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total_steps:
        evaluate_unless_stopped(stop)
        last_log = time.time()
      bar.update(1)
      stop.requested |= should_stop is not None and should_stop(done)
      stopped = stop.agreed(done)
      # The last step's checkpoint is written after the final evaluation; none is written
      # inside a non-finite streak, so the last one before it stays the newest good one.
      periodic = done % config.checkpoint_every_steps == 0 and done < total_steps and not in_row
      if stopped or periodic:
        if interval and stopped:
          writer.write({'kind': 'train', 'step': done, **metrics_lib.summarize(interval)})
          interval = []
        save()
      if stopped:
        break

    summary = {'step': int(state.step), 'top1': None, 'plot': None}
    if not stop.stopped:
      result = evaluate_unless_stopped(stop)
      save()
      summary['top1'] = result and result['top1']
    checkpoints.close()  # waits for the last write, still under the stop handler
    best.close()
  writer.close()
  if primary:
    summary['plot'] = plots.plot_runs({'': writer.history},
                                      os.path.join(workdir, 'training.png'))
  return state, summary


if __name__ == '__main__':
  from bhvit_jax import main  # pylint: disable=g-import-not-at-top
  main.run()
