r"""Trains BHViT: `python -m bhvit_jax.train --config configs/demo.py --workdir runs/demo`.

Restarting the same command resumes from the newest checkpoint in WORKDIR/checkpoints (bitwise
the same result as an uninterrupted run on CPU: the data order, dropout keys and optimizer
state are all functions of the step). Writes WORKDIR/metrics.jsonl, TensorBoard events in
WORKDIR/tb and WORKDIR/training.png.

Reusable pieces: `create_train_state`, `make_train_step`, `make_eval_step`, `evaluate`.
"""
import ctypes
import functools
import importlib.util
import itertools
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
from absl import logging as absl_logging
import flax
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import config_lib
from bhvit_jax import data as data_lib
from bhvit_jax import losses
from bhvit_jax import model as model_lib
from bhvit_jax import optim
from bhvit_jax import plots
from bhvit_jax import sharding as sharding_lib

PyTree = Any


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with NaN/Inf loss or gradients."""


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

  def variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats,
            'quant_state': self.quant_state}


def create_train_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
  """TrainState at step 0 from model variables ({'params', 'batch_stats'?, 'quant_state'?})."""
  params = variables['params']
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
  return TrainState(step=zero(), params=params, batch_stats=variables.get('batch_stats', {}),
                    quant_state=variables.get('quant_state', {}), opt_state=tx.init(params),
                    nonfinite_in_row=zero(), nonfinite_total=zero())


def binarized_mask(params: PyTree, model) -> PyTree:
  """Bool pytree of the latent weights the forward pass binarizes (for the sign-flip rate)."""
  if model.weight_bits != 1:
    return jax.tree_util.tree_map(lambda _: False, params)
  binary_proj = not model.some_fp

  def is_binary(path, _):
    names = losses.path_names(path)
    if len(names) < 2 or names[-1] != 'kernel':
      return False
    return names[-2] in losses.REGULARIZED_MODULES or (
        binary_proj and names[-2] == 'proj' and names[0].startswith('patch_embed'))
  return jax.tree_util.tree_map_with_path(is_binary, params)


def _centred_signs(w):
  # Binarization takes the sign of the weight centred per output channel (last axis).
  w = w.astype(jnp.float32)
  return jnp.sign(w - jnp.mean(w, axis=tuple(range(w.ndim - 1)), keepdims=True))


def sign_flip_rate(old_params: PyTree, new_params: PyTree, mask: PyTree):
  """Fraction of binarized weights whose binary value's sign changed (0 when none)."""
  flips, total = jnp.zeros((), jnp.float32), 0
  for old, new, m in zip(jax.tree_util.tree_leaves(old_params),
                         jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(mask)):
    if m:
      flips += jnp.sum(_centred_signs(old) != _centred_signs(new))
      total += old.size
  return flips / max(total, 1)


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(model, tx: optax.GradientTransformation, *, loss_config,
                    lr_fn: Callable, beta_fn: Callable, reg_in_loss: bool = False,
                    teacher_model=None, calibrate: bool = True) -> Callable:
  """Builds the pure `train_step(state, batch, rng[, teacher_variables]) -> (state, metrics)`.

  `batch` is {'image': [B, H, W, 3] float, 'label': [B] int}; `rng` is the run's base key,
  folded with the step so dropout keys depend only on (seed, step). A step whose loss or
  gradients are not finite leaves params, statistics and optimizer state unchanged.
  Non-gsb attention quantizers that were never calibrated (flag 0 in `quant_state`) take
  their first-batch α and z inside the step, as the reference's first train forward does;
  with `calibrate=False` the step instead refuses them (`model.calibrate` must run first).
  """
  def train_step(state: TrainState, batch, rng, teacher_variables=None):
    if state.quant_state and not calibrate:
      _refuse_uncalibrated(state.quant_state)
    images, labels = batch['image'], batch['label']
    teacher_logits = None
    if teacher_model is not None:
      teacher_logits = jax.lax.stop_gradient(
          teacher_model.apply(teacher_variables, images, train=False)).astype(jnp.float32)
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      if state.quant_state:
        variables['quant_state'] = state.quant_state
      logits, updates = model.apply(variables, images, train=True, calibrate=calibrating,
                                    mutable=['batch_stats', 'quant_state', 'calibration'],
                                    rngs={'dropout': dropout_rng})
      loss, parts = losses.total_loss(
          logits, labels, teacher_logits, label_smoothing=loss_config.label_smoothing,
          ce_weight=loss_config.ce_weight, distill_weight=loss_config.distill_weight)
      if reg_in_loss:
        loss = loss + beta_fn(state.step) * losses.oscillation_regularizer(params)
      return loss, (logits, updates, parts)

    (loss, (logits, model_updates, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    batch_stats = model_updates.get('batch_stats', {})
    # The reference overwrites α and z in its first forward; Adam then updates those values.
    start = (model_lib.with_calibration(state.params, model_updates.get('calibration', {}))
             if calibrating else state.params)
    updates, opt_state = tx.update(grads, state.opt_state, start)
    params = optax.apply_updates(start, updates)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    in_row = jnp.where(finite, 0, state.nonfinite_in_row + 1)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, start),
        quant_state=model_updates.get('quant_state', state.quant_state),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state), nonfinite_in_row=in_row,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = {
        'step': state.step, 'loss': loss, 'ce': parts['ce'], 'kd': parts['kd'],
        'reg': losses.oscillation_regularizer(state.params), 'lr': lr_fn(state.step),
        'beta': jnp.asarray(beta_fn(state.step), jnp.float32),
        'train_top1': jnp.mean(jnp.argmax(logits, -1) == labels),
        'sign_flip_rate': sign_flip_rate(state.params, new_state.params,
                                         binarized_mask(state.params, model)),
        'grad_norm': optax.tree.norm(grads), 'finite': finite,
        'nonfinite_in_row': in_row, 'nonfinite_total': new_state.nonfinite_total}
    return new_state, metrics

  calibrating = calibrate and model.input_bits != 32 and not model.gsb
  return train_step


def _refuse_uncalibrated(quant_state):
  """Raises UserError when a quantizer flag is 0 (checked on the host inside a jit)."""
  def check(*flags_):
    if not model_lib.is_calibrated(flags_):
      raise config_lib.UserError(
          'train step built with calibrate=False got uncalibrated attention quantizers '
          '(quant_state init_state = 0): run model.calibrate(model, variables, first_images) '
          'before create_train_state, or build the step with calibrate=True')
  leaves = jax.tree_util.tree_leaves(quant_state)
  if any(isinstance(f, jax.core.Tracer) for f in leaves):
    jax.debug.callback(check, *leaves)
  else:
    check(*leaves)


def make_eval_step(model) -> Callable:
  """`eval_step(state, batch) -> eval_sums` of the eval-mode model."""

  def eval_step(state: TrainState, batch):
    variables = {k: v for k, v in state.variables().items() if v}
    return eval_sums(model.apply(variables, batch['image'], train=False), batch)
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
    raise ValueError('evaluation set is empty')
  totals = sharding_lib.fetch(totals)
  count = max(float(totals['count']), 1.0)
  return {'top1': 100.0 * float(totals['correct']) / count,
          'top5': 100.0 * float(totals['correct5']) / count,
          'loss': float(totals['loss']) / count, 'examples': int(totals['count'])}


# ------------------------------------------------------------- loading ---


def build_model(model_config, compute_dtype: str = 'float32'):
  """BHViT with float32 params and `compute_dtype` activations."""
  fields = dict(model_config)
  if compute_dtype != 'float32':
    fields['dtype'] = compute_dtype
  return model_lib.from_config(fields)


def check_num_classes(config, model):
  """Raises ValueError when the model's classifier does not match the config's data set."""
  classes = data_lib.num_classes(config)
  if classes != model.num_classes:
    raise ValueError(f'model.num_classes={model.num_classes} but data set '
                     f'{config.data.name!r} has {classes} classes')


def init_variables(model, rng) -> dict:
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  return flax.core.unfreeze(jax.jit(functools.partial(model.init, train=False))(
      {'params': rng}, images))


def load_pretrained(path: str, model, reference: dict) -> dict:
  """Variables from a PyTorch state dict (.pth/.pt, or `.npz` of its arrays by name), a Flax
  `.msgpack` file or an orbax run/checkpoint directory.

  Raises a ShapeMismatchError listing every leaf that differs from `reference`.
  """
  from bhvit_jax import convert  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path) or path.endswith('.msgpack'):
    loaded = convert.load_flax_variables(path)
  elif path.endswith(('.pth', '.pt', '.npz')):
    loaded = convert.torch_to_flax(convert.load_torch_file(path), model)
  else:
    raise ValueError(f'{path!r}: expected a .pth/.pt file, a .npz state dict, a .msgpack file '
                     'or an orbax directory')
  loaded = {k: v for k, v in loaded.items() if k in reference and v}
  if 'params' not in loaded:
    raise ValueError(f'pretrained weights {path} contain no params')
  ckpt_lib.check_shapes(loaded, {k: reference[k] for k in loaded}, f'pretrained weights {path}')
  merged = dict(reference)
  merged.update({k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in loaded.items()})
  return merged


def _needs_calibration(variables) -> bool:
  # As the reference: a quantizer calibrates on its first train forward iff its flag is 0.
  flags_ = jax.tree_util.tree_leaves(variables.get('quant_state', {}))
  return any(not bool(np.all(np.asarray(f))) for f in flags_)


load_config_file = config_lib.load_config_file


def _teacher_bhvit(teacher_config, student_config):
  if not teacher_config.checkpoint:
    raise ValueError("loss.teacher.kind='bhvit' needs loss.teacher.checkpoint (.pth or orbax dir)")
  model_config = student_config.model
  if teacher_config.get('config'):
    model_config = load_config_file(teacher_config.config).model
  model = build_model(model_config, student_config.compute_dtype)
  reference = init_variables(model, jax.random.PRNGKey(0))
  return model, load_pretrained(teacher_config.checkpoint, model, reference)


def _teacher_deit(teacher_config, student_config):
  from bhvit_jax import deit  # pylint: disable=g-import-not-at-top
  return deit.build_teacher(teacher_config, student_config)


TEACHERS = {'bhvit': _teacher_bhvit, 'deit': _teacher_deit}


def build_teacher(config):
  """(module, variables) of the distillation teacher, or (None, None) for kind 'none'."""
  kind = config.loss.teacher.kind
  if kind == 'none':
    return None, None
  if kind not in TEACHERS:
    raise ValueError(f"unknown loss.teacher.kind {kind!r}; expected 'none' or one of "
                     f'{sorted(TEACHERS)}')
  return TEACHERS[kind](config.loss.teacher, config)


# ------------------------------------------------------------- logging ---


class MetricsWriter:
  """metrics.jsonl (rewritten from the checkpointed history on resume) + TensorBoard.

  Every process keeps the history (it is checkpointed); only an `active` one writes files.
  """

  def __init__(self, workdir: str, history: list, active: bool = True):
    self.history = list(history)
    self.active = active
    if not active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.path = os.path.join(workdir, 'metrics.jsonl')
    with open(self.path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in self.history)
    self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, record: dict):
    self.history.append(record)
    if not self.active:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    prefix = record.get('kind', 'train')
    for key, value in record.items():
      if key not in ('step', 'kind') and isinstance(value, (int, float)):
        self._tb.add_scalar(f'{prefix}/{key}', value, record['step'])
    self._tb.flush()

  def close(self):
    if self.active:
      self._tb.close()


def _summarize(device_metrics: list) -> dict:
  """Means over a logging interval of per-step metrics fetched from the device."""
  host = sharding_lib.fetch(device_metrics)
  record = {k: float(np.mean([m[k] for m in host])) for k in host[-1] if k != 'step'}
  record['train_top1'] *= 100.0
  for key in ('nonfinite_in_row', 'nonfinite_total'):
    record[key] = int(host[-1][key])
  return record


# ------------------------------------------------------------ the loop ---


def _total_steps(config, steps_per_epoch: int) -> int:
  if config.get('total_steps'):
    return int(config.total_steps)
  if config.get('num_epochs'):
    return int(config.num_epochs) * steps_per_epoch
  raise ValueError('set config.total_steps or config.num_epochs')


class _SigtermFlag:
  """Set by SIGTERM so the loop can write a final checkpoint before exiting."""

  def __init__(self):
    self.is_set = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and exiting.')
    self.is_set = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _stop_after(flag: _SigtermFlag, batches):
  """`batches` until the flag is set (at least one, so an evaluation is never empty)."""
  for batch in batches:
    yield batch
    if flag.is_set:
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
  """The non-gsb quantizers' first-batch calibration (SPEC §2) before the first step."""
  calibrated, _ = jax.jit(functools.partial(model_lib.calibrate, model))(
      state.variables(), images)
  return state.replace(params=calibrated['params'], quant_state=calibrated['quant_state'])


def release_host_memory():
  """Hands memory freed on the C heap back to the operating system.

  Compiling the train step leaves ~1.5 GiB freed but resident in glibc's heap, where the
  step's large buffers cannot reuse it; trimming once after the compile lowers the training
  process's peak by that much. A no-op where `malloc_trim` does not exist.
  """
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _nonfinite_error(step, in_row, limit, checkpoints) -> NonFiniteError:
  last = checkpoints.latest_step()
  where = os.path.join(checkpoints.directory, str(last)) if last is not None else 'none'
  return NonFiniteError(
      f'stopping at step {step}: {in_row} consecutive steps with non-finite loss or gradients '
      f'(max_nonfinite_in_row={limit}). Last good checkpoint: {where}. Lower the learning '
      'rate or set optim.grad_clip_norm, then restart.')


def train_and_evaluate(config, workdir: str, *, mesh=None,
                       should_stop: Optional[Callable[[int], bool]] = None):
  """Runs (or resumes) training and a final evaluation.

  Args:
    config: the shared ml_collections schema.
    workdir: checkpoints, metrics.jsonl, tb/ and training.png go here.
    mesh: optional jax Mesh with axes ('data', 'fsdp') (see `sharding`); default the one of
      config.mesh over all devices of all processes (started by `initialize_distributed`).
    should_stop: optional `f(step) -> bool` checked after each step; when true the loop saves
      a checkpoint and returns early, as on SIGTERM.
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
  model = build_model(config.model, config.compute_dtype)
  check_num_classes(config, model)
  steps_per_epoch = max(data_lib.num_train_examples(config) // config.batch_size, 1)
  total_steps = _total_steps(config, steps_per_epoch)
  reg_in_loss = config.optim.get('reg_placement', 'optimizer') == 'loss'
  tx, lr_fn, beta_fn = optim.build_optimizer(
      config.optim, global_batch_size=config.batch_size, total_steps=total_steps,
      steps_per_epoch=steps_per_epoch, reg_in_optimizer=not reg_in_loss)
  teacher_model, teacher_variables = build_teacher(config)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  variables = init_variables(model, init_rng)
  if config.get('init_from'):
    variables = load_pretrained(config.init_from, model, variables)
  state = create_train_state(variables, tx)
  state_shardings = sharding_lib.tree_shardings(mesh, state)
  teacher_shardings = sharding_lib.tree_shardings(mesh, teacher_variables)
  replicated, batch_sharding = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
  state, teacher_variables, step_rng = sharding_lib.put(
      (state, teacher_variables, step_rng), (state_shardings, teacher_shardings, replicated))

  checkpoints = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                      config.checkpoint_every_steps, config.keep_checkpoints)
  state, step_rng, history, train_iter = _resume(config, checkpoints, state, step_rng, block)
  start_step = int(sharding_lib.fetch(state.step))

  train_step = sharding_lib.jit_train_step(
      make_train_step(model, tx, loss_config=config.loss, lr_fn=lr_fn, beta_fn=beta_fn,
                      reg_in_loss=reg_in_loss, teacher_model=teacher_model),
      mesh, state_shardings, teacher_shardings)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings, batch_sharding),
                      out_shardings=replicated)
  put_batch = functools.partial(sharding_lib.global_batch, mesh)
  eval_batches = lambda: map(put_batch, data_lib.build_eval_iter(
      config, process_index=eval_block[0], process_count=eval_block[1]))
  writer = MetricsWriter(workdir, history, active=primary)

  def evaluate_unless_stopped(sigterm):
    """The eval record, written; None when SIGTERM cut the evaluation short (not written)."""
    result = evaluate(eval_step, state, _stop_after(sigterm, eval_batches()))
    if sigterm.is_set:
      return None
    writer.write({'kind': 'eval', 'step': int(state.step), **result})
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
  stopped = False
  log_every = max(int(config.log_every_steps), 1)
  with _SigtermFlag() as sigterm, tqdm(total=total_steps, initial=start_step, disable=not primary,
                                       dynamic_ncols=True, mininterval=2.0) as bar:
    for step in range(start_step, total_steps):
      batch = put_batch(next(batches))
      state, metrics = train_step(state, batch, step_rng, teacher_variables)
      if step == start_step:
        release_host_memory()  # after the first call, which compiled the step
      interval.append(metrics)
      done = step + 1
      in_row = int(metrics['nonfinite_in_row'])
      if not bool(metrics['finite']):
        logging.warning('step %d: non-finite loss or gradients, update skipped (%d in a row)',
                        step, in_row)
      if in_row >= config.max_nonfinite_in_row:
        writer.write({'kind': 'train', 'step': done, **_summarize(interval)})
        checkpoints.wait()
        raise _nonfinite_error(step, in_row, config.max_nonfinite_in_row, checkpoints)
      if done % log_every == 0 or done == total_steps:
        now = time.time()
        record = {'kind': 'train', 'step': done, **_summarize(interval),
                  'images_per_sec': len(interval) * config.batch_size / (now - last_log)}
        writer.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", top1=f"{record['train_top1']:.1f}",
                        img_s=f"{record['images_per_sec']:.0f}")
        interval, last_log = [], now
      if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total_steps:
        evaluate_unless_stopped(sigterm)
        last_log = time.time()
      bar.update(1)
      stopped = sigterm.is_set or (should_stop is not None and should_stop(done))
      # The last step's checkpoint is written after the final evaluation; none is written
      # inside a non-finite streak, so the last one before it stays the newest good one.
      periodic = done % config.checkpoint_every_steps == 0 and done < total_steps and not in_row
      if stopped or periodic:
        if interval and stopped:
          writer.write({'kind': 'train', 'step': done, **_summarize(interval)})
          interval = []
        save()
      if stopped:
        break

    summary = {'step': int(state.step), 'top1': None, 'plot': None}
    if not stopped:
      result = evaluate_unless_stopped(sigterm)
      save()
      summary['top1'] = result and result['top1']
    checkpoints.close()  # waits for the last write, still under the SIGTERM flag
  writer.close()
  if primary:
    summary['plot'] = plots.plot_runs({'': writer.history},
                                      os.path.join(workdir, 'training.png'))
  return state, summary


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')


# Failures caused by the config, the data or the files given: reported as one `error:` line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ImportError,
               NotImplementedError)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines drown the bar
  try:
    config_lib.validate(_CONFIG.value)
    _, summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except NonFiniteError as e:
    config_lib.fail(str(e), code=1)
  except USER_ERRORS as e:
    logging.debug('traceback of the error below', exc_info=True)
    config_lib.fail(str(e))
  if summary['top1'] is None:
    print(f"stopped at step {summary['step']}; checkpoint saved, rerun the same command to "
          'resume.')
  else:
    print(f"held-out top-1: {summary['top1']:.2f}%")
  print(f"training plot: {summary['plot']}")


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=config_lib.parse_flags)
