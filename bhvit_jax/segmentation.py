"""Semantic segmentation with a BHViT backbone: an FPN head, a dense digits task, mIoU.

The task: `image_size`² canvases cut into `cells`² cells, each holding an embedded MNIST
digit (28², at a random offset) with probability 3/4; a pixel's class is 1 + its digit where
the digit's stroke is (intensity > 127), 0 (background) elsewhere. Canvases are a pure
function of (seed, split, index): training canvases use the train digits, the held-out ones
the test digits.

`train_and_evaluate` reuses the classification pieces (TrainState, `optim.build_optimizer`,
the Checkpointer, MetricsWriter, calibration): `python -m bhvit_jax.train --config
configs/segmentation_demo.py --workdir W` dispatches here on `config.task`.
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import config_lib
from bhvit_jax import data as data_lib
from bhvit_jax import layers
from bhvit_jax import metrics as metrics_lib
from bhvit_jax import model as model_lib
from bhvit_jax import optim
from bhvit_jax import train as train_lib

NUM_CLASSES = 11  # background + ten digits
DIGIT_SIZE = 28
STROKE_THRESHOLD = 127
_TRAIN_TAG, _EVAL_TAG = 0, 1


# ---------------------------------------------------------------- the task ---


def canvas(digits, rng: np.random.Generator, image_size: int, cells: int):
  """One canvas: (uint8 [S, S] image, int32 [S, S] classes) from `digits` (an MnistSource)."""
  cell = image_size // cells
  image = np.zeros((image_size, image_size), np.uint8)
  classes = np.zeros((image_size, image_size), np.int32)
  for row in range(cells):
    for col in range(cells):
      if rng.random() >= 0.75:
        continue
      digit, label = digits[int(rng.integers(len(digits)))]
      top = row * cell + int(rng.integers(cell - DIGIT_SIZE + 1))
      left = col * cell + int(rng.integers(cell - DIGIT_SIZE + 1))
      window = (slice(top, top + DIGIT_SIZE), slice(left, left + DIGIT_SIZE))
      image[window] = digit[..., 0]
      classes[window] = np.where(digit[..., 0] > STROKE_THRESHOLD, label + 1, 0)
  return image, classes


def check_geometry(image_size: int, cells: int):
  if cells < 1 or image_size // cells < DIGIT_SIZE:
    raise config_lib.UserError(f'segmentation.cells={cells}: each of the {cells}x{cells} cells of a '
                     f'{image_size}² canvas must hold a {DIGIT_SIZE}² digit')


def batch(config, split: str, index: int, size: int) -> dict:
  """Canvases `index·size ...` of `split`: {'image': float32 [B, S, S, 3], 'mask': int32
  [B, S, S]}, normalized as the classification data."""
  seg = config.segmentation
  tag = _TRAIN_TAG if split == config.data.train_split else _EVAL_TAG
  digits = data_lib.MnistSource(split, DIGIT_SIZE)
  images, masks = zip(*(
      canvas(digits, np.random.default_rng([config.seed, tag, index * size + i]),
             config.data.image_size, seg.cells) for i in range(size)))
  mean, std = data_lib.normalization(config)
  rgb = np.repeat(np.stack(images)[..., None], 3, axis=-1)
  return {'image': data_lib.normalize(rgb, mean, std), 'mask': np.stack(masks)}


# ------------------------------------------------------------------ the model ---


class ConvUnit(nn.Module):
  """conv k×k (binary or full precision) → norm → RPReLU (binary) / ReLU."""
  features: int
  kernel_size: int
  binary: bool
  norm: str = 'batch'

  @nn.compact
  def __call__(self, x, train):
    """`[B, H, W, C]` -> `[B, H, W, features]`."""
    bits = 1 if self.binary else 32
    y = layers.BinaryConv(self.features, self.kernel_size, padding=self.kernel_size // 2,
                          weight_bits=bits, input_bits=bits, use_bias=False, name='conv')(x)
    y = layers.TokenNorm(self.norm, name='norm')(y, train)
    return layers.RPReLU(name='rprelu')(y) if self.binary else nn.relu(y)


def upsample(x, factor: int):
  """Nearest-neighbour upsampling `[B, H, W, C]` -> `[B, H·f, W·f, C]`."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class FPNHead(nn.Module):
  """Semantic FPN: 1×1 laterals, top-down sums, 3×3 smoothing, all levels summed at 1/4.

  `binary` makes the lateral and smoothing convs 1-bit (weights and inputs); the final
  classifier conv stays full precision, as the backbone's classifier.
  """
  num_classes: int
  features: int = 64
  binary: bool = False
  norm: str = 'batch'

  @nn.compact
  def __call__(self, maps, train):
    """Stage maps `[B, H/s_i, W/s_i, C_i]` (finest first, each half the previous) ->
    `[B, H/s_0, W/s_0, num_classes]` logits."""
    unit = functools.partial(ConvUnit, self.features, binary=self.binary, norm=self.norm)
    levels = [unit(1, name=f'lateral{i}')(m, train) for i, m in enumerate(maps)]
    for i in reversed(range(len(levels) - 1)):
      levels[i] = levels[i] + upsample(levels[i + 1], 2)
    fused = sum(upsample(unit(3, name=f'smooth{i}')(level, train), 2 ** i)
                for i, level in enumerate(levels))
    return layers.BinaryConv(self.num_classes, 1, weight_bits=32, input_bits=32,
                             name='classifier')(fused)


class SegmentationModel(nn.Module):
  """BHViT backbone + FPN head; logits upsampled bilinearly to the input size."""
  backbone: model_lib.BHViT
  head: FPNHead

  def __call__(self, images, train: bool = False, calibrate: bool = False):
    """`[B, H, W, 3]` -> `[B, H, W, num_classes]` logits."""
    logits = self.head(self.backbone(images, train, calibrate, features=True), train)
    return jax.image.resize(logits, images.shape[:3] + logits.shape[-1:], 'bilinear')


def build_model(config) -> SegmentationModel:
  backbone = model_lib.build(config.model, config.compute_dtype)
  seg = config.segmentation
  check_geometry(backbone.image_size, seg.cells)
  return SegmentationModel(backbone, FPNHead(NUM_CLASSES, seg.head_features, seg.binary_head,
                                             backbone.norm))


# ----------------------------------------------------------------- metrics ---


def pixel_loss(logits, mask):
  """Mean per-pixel softmax cross-entropy."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), mask))


def confusion(predictions, mask, num_classes: int = NUM_CLASSES):
  """`[K, K]` counts of (true class, predicted class) over all pixels."""
  pairs = mask.reshape(-1) * num_classes + predictions.reshape(-1)
  return jnp.bincount(pairs, length=num_classes ** 2).reshape(num_classes, num_classes)


def mean_iou(counts) -> float:
  """Mean over the classes present (in truth or prediction) of TP / (TP + FP + FN), in %."""
  counts = np.asarray(counts, np.float64)
  tp = np.diag(counts)
  union = counts.sum(0) + counts.sum(1) - tp
  present = union > 0
  return 100.0 * float(np.mean(tp[present] / union[present]))


# ---------------------------------------------------------------- training ---


def make_train_step(model, tx, lr_fn):
  """`train_step(state, batch, rng) -> (state, metrics)` on per-pixel cross-entropy."""
  def train_step(state, batch, rng):
    def loss_fn(params):
      variables = {k: v for k, v in state.variables().items() if v}
      variables['params'] = params
      logits, updates = model.apply(variables, batch['image'], train=True,
                                    mutable=['batch_stats'],
                                    rngs={'dropout': jax.random.fold_in(rng, state.step)})
      return pixel_loss(logits, batch['mask']), (logits, updates['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, batch_stats=batch_stats, opt_state=opt_state,
                              params=optax.apply_updates(state.params, updates))
    pixel_acc = jnp.mean(jnp.argmax(logits, -1) == batch['mask'])
    return new_state, {'loss': loss, 'pixel_acc': 100.0 * pixel_acc, 'lr': lr_fn(state.step)}
  return train_step


def make_eval_step(model):
  """`eval_step(variables, images, mask) -> [K, K]` confusion counts of one batch."""
  def eval_step(variables, images, mask):
    return confusion(jnp.argmax(model.apply(variables, images, train=False), -1), mask)
  return eval_step


def evaluate(eval_step, state, config) -> dict:
  """mIoU and pixel accuracy (%) over the `segmentation.eval_canvases` held-out canvases."""
  variables = {k: v for k, v in state.variables().items() if v}
  size = config.get('eval_batch_size') or config.batch_size
  total = sum(np.asarray(eval_step(variables, b['image'], b['mask'])) for b in (
      batch(config, config.data.eval_split, i, size)
      for i in range(-(-config.segmentation.eval_canvases // size))))
  return {'miou': mean_iou(total), 'pixel_acc': 100.0 * np.trace(total) / total.sum()}


def train_and_evaluate(config, workdir: str):
  """Trains (or resumes) the segmentation model; returns (state, {'step', 'miou'})."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if config.get('init_from'):
    raise config_lib.UserError(f'config.init_from={config.init_from!r}: the segmentation task '
                               'starts from scratch (loading a backbone is not supported yet)')
  model = build_model(config)
  os.makedirs(workdir, exist_ok=True)
  total_steps = int(config.total_steps)
  # Canvases are generated, not drawn from a finite set: one 'epoch' is the whole run.
  tx, lr_fn, _ = optim.build_optimizer(config.optim, global_batch_size=config.batch_size,
                                       total_steps=total_steps, steps_per_epoch=total_steps)
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  first = batch(config, config.data.train_split, 0, config.batch_size)
  variables = jax.jit(functools.partial(model.init, train=False))(
      {'params': init_rng}, first['image'][:1])
  state = train_lib.create_train_state(variables, tx)
  checkpoints = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                      config.checkpoint_every_steps, config.keep_checkpoints)
  restored = checkpoints.restore({'train': state})
  history = []
  if restored is not None:
    state, history = restored[1]['train'], restored[2]['history']
  elif train_lib._needs_calibration(state.variables()):  # pylint: disable=protected-access
    state = train_lib._calibrate(model, state, first['image'])  # pylint: disable=protected-access
  writer = metrics_lib.MetricsWriter(workdir, history)
  train_step = jax.jit(make_train_step(model, tx, lr_fn), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model))

  def save(state):
    checkpoints.save(int(state.step), {'train': state}, {'history': writer.history}, force=True)

  start, interval = int(state.step), []
  with tqdm(total=total_steps, initial=start, dynamic_ncols=True, mininterval=2.0) as bar:
    for step in range(start, total_steps):
      state, metrics = train_step(state, batch(config, config.data.train_split, step,
                                               config.batch_size), step_rng)
      interval.append(metrics)
      done = step + 1
      if done % config.log_every_steps == 0 or done == total_steps:
        record = {k: float(np.mean([m[k] for m in jax.device_get(interval)]))
                  for k in interval[0]}
        writer.write({'kind': 'train', 'step': done, **record})
        bar.set_postfix(loss=f"{record['loss']:.3f}", pixel_acc=f"{record['pixel_acc']:.1f}")
        interval = []
      if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total_steps:
        writer.write({'kind': 'eval', 'step': done, **evaluate(eval_step, state, config)})
      if done % config.checkpoint_every_steps == 0 and done < total_steps:
        save(state)
      bar.update(1)
  result = evaluate(eval_step, state, config)
  if checkpoints.latest_step() != int(state.step):
    writer.write({'kind': 'eval', 'step': int(state.step), **result})
    save(state)
  checkpoints.close()
  writer.close()
  return state, {'step': int(state.step), 'miou': result['miou']}
