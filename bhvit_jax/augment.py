"""The official recipe's augmentation options with timm's semantics, all off by default.

Three stages, in the order timm's ImageNet train transform applies them:

1. per image, on uint8 [H, W, 3] after the random-resized crop and flip:
   `rand_augment` (RandAugment, e.g. 'rand-m9-mstd0.5-inc1') or, only when RandAugment is
   off, `color_jitter` (timm enables colour jitter only without an auto-augment policy);
2. per image, on the normalized float32 [H, W, 3]: `random_erasing` (the erased pixels are
   drawn in normalized units, as timm erases after `Normalize`);
3. per batch, on float32 [B, H, W, 3]: `mix_batch` (mixup or cutmix against the reversed
   batch, timm's 'batch' mode) returning soft targets [B, K] with the label smoothing folded
   in; the loss then takes soft targets (`losses.soft_cross_entropy`). `draw_mix` and
   `apply_mix` split it into the host-side draw and the arithmetic, which also runs on
   device.

`repeated_indices` / `repeated_epoch_order` replace the epoch permutation for repeated
augmentation (each example `num_repeats` times per epoch, the copies on different replicas).

Determinism: every function draws only from the `np.random.Generator` it is given, so its
output is a pure function of the generator's seed. Callers derive the generators as
  per image:  the generator data.py seeds with (seed, step, slot) for the crop and flip,
              continued (stages 1 and 2 draw nothing when off, so an option left off
              changes no other draw);
  per batch:  `batch_rng(seed, step, process_index)`;
  per epoch:  `repeated_*` take (seed, epoch) and seed their own generator;
so a resumed run (same seed, same step) reproduces every augmentation bitwise.
"""
import dataclasses
import functools
import math
import re

import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bhvit_jax.config_lib import ConfigError

MIX_TAG, REPEAT_TAG = 2, 3  # data.py seeds the shuffle with tag 0, the per-image draws with 1
LEVEL_DENOM = 10.0  # a RandAugment magnitude of 10 is an op's full strength
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_MODES = ('const', 'rand', 'pixel')
RESAMPLE = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST}


def defaults() -> ml_collections.ConfigDict:
  """The `config.augment` block; every option off, as in the published training script.

  The official code's own argument defaults would be rand_augment='rand-m9-mstd0.5-inc1',
  color_jitter=0.4 (unused beside RandAugment), reprob=0.25, mixup_alpha=0.8,
  cutmix_alpha=1.0, and repeated_aug=3 when its repeated-augmentation flag is given.
  """
  return ml_collections.ConfigDict(dict(
      rand_augment='',  # timm spec 'rand-m<M>[-n<N>][-mstd<S>][-mmax<X>][-inc<0|1>]'
      interpolation='bicubic',  # of RandAugment's rotate/shear/translate
      color_jitter=0.0,  # brightness = contrast = saturation strength; ignored with RandAugment
      reprob=0.0,  # probability of random erasing per image
      remode='pixel',  # erased values: 'pixel' N(0,1) per pixel, 'rand' per channel, 'const' 0
      recount=1,  # erase between 1 and recount rectangles
      mixup_alpha=0.0,  # Beta(α, α) for mixup's λ; 0 = mixup off
      cutmix_alpha=0.0,  # Beta(α, α) for cutmix's λ; 0 = cutmix off
      mixup_prob=1.0,  # probability a batch is mixed at all
      mixup_switch_prob=0.5,  # with both on: probability of cutmix instead of mixup
      repeated_aug=1))  # copies of each example per epoch; 1 = off


def validate(augment: ml_collections.ConfigDict):
  """Raises ConfigError naming the first unusable `config.augment` value."""
  if augment.rand_augment:
    parse_rand_augment(augment.rand_augment)
  checks = [
      ('interpolation', augment.interpolation in RESAMPLE, f'one of {tuple(RESAMPLE)}'),
      ('remode', augment.remode in ERASE_MODES, f'one of {ERASE_MODES}'),
      ('recount', augment.recount >= 1, '>= 1'),
      ('repeated_aug', augment.repeated_aug >= 1, '>= 1'),
      ('color_jitter', augment.color_jitter >= 0, '>= 0'),
      ('mixup_alpha', augment.mixup_alpha >= 0, '>= 0'),
      ('cutmix_alpha', augment.cutmix_alpha >= 0, '>= 0'),
  ] + [(name, 0 <= augment[name] <= 1, 'in [0, 1]')
       for name in ('reprob', 'mixup_prob', 'mixup_switch_prob')]
  for name, ok, expected in checks:
    if not ok:
      raise ConfigError(f'augment.{name} must be {expected}, got {augment[name]!r}')


def mixing_active(augment: ml_collections.ConfigDict) -> bool:
  """Whether batches carry soft targets (then the loss must be `soft_cross_entropy`)."""
  return augment.mixup_alpha > 0 or augment.cutmix_alpha > 0


# ----------------------------------------------------------- RandAugment ---


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed 'rand-…' string (timm's keys; `w` op weights are not supported)."""
  magnitude: float = LEVEL_DENOM
  num_ops: int = 2
  magnitude_std: float = 0.0  # Gaussian noise on the magnitude; inf = uniform in [0, m]
  magnitude_max: float = LEVEL_DENOM
  increasing: bool = False  # the '…Increasing' op variants: stronger as the magnitude grows


@functools.lru_cache(maxsize=8)
def parse_rand_augment(spec: str) -> RandAugmentSpec:
  """'rand-m9-mstd0.5-inc1' -> RandAugmentSpec(magnitude=9, magnitude_std=0.5, increasing=True)."""
  parts = spec.split('-')
  if parts[0] != 'rand':
    raise ConfigError(f"augment.rand_augment must start with 'rand', got {spec!r}")
  fields = {}
  for part in parts[1:]:
    match = re.fullmatch(r'(mstd|mmax|inc|m|n)(\d+(?:\.\d*)?)', part)
    if match is None:
      raise ConfigError(f'augment.rand_augment: unknown section {part!r} in {spec!r} '
                        '(expected m<M>, n<N>, mstd<S>, mmax<X>, inc<0|1>)')
    key, value = match.groups()
    if key == 'm':
      fields['magnitude'] = float(int(value))
    elif key == 'n':
      fields['num_ops'] = int(value)
    elif key == 'mstd':
      # timm: a std above 100 means "uniform in [0, magnitude]".
      fields['magnitude_std'] = math.inf if float(value) > 100 else float(value)
    elif key == 'mmax':
      fields['magnitude_max'] = float(int(value))
    else:
      fields['increasing'] = bool(int(value))
  return RandAugmentSpec(**fields)


def _negate_half(value, rng):
  return -value if rng.random() < 0.5 else value


def _affine(image, coefficients, fill, resample):
  return image.transform(image.size, Image.AFFINE, coefficients, resample=resample,
                         fillcolor=fill)


def _solarize_add(image, add, threshold=128):
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def _posterize(image, bits):
  # Keeps the top `bits` bits; 0 bits (the increasing variant at full strength) is black,
  # which PIL's ImageOps.posterize no longer accepts.
  mask = 255 & ~(2 ** (8 - min(bits, 8)) - 1)
  return image.point([i & mask for i in range(256)] * len(image.getbands()))


def _enhance(enhancer):
  return lambda image, factor, fill, resample: enhancer(image).enhance(factor)


def _no_arg(op):
  return lambda image, _, fill, resample: op(image)


# name -> (op(PIL image, argument, fill, resample), argument(magnitude, rng, increasing)).
_OPS = {
    'AutoContrast': (_no_arg(ImageOps.autocontrast), lambda m, rng, inc: None),
    'Equalize': (_no_arg(ImageOps.equalize), lambda m, rng, inc: None),
    'Invert': (_no_arg(ImageOps.invert), lambda m, rng, inc: None),
    'Rotate': (lambda im, deg, fill, rs: im.rotate(deg, resample=rs, fillcolor=fill),
               lambda m, rng, inc: _negate_half(m / LEVEL_DENOM * 30.0, rng)),
    'Posterize': (lambda im, bits, fill, rs: _posterize(im, bits),
                  lambda m, rng, inc: (4 - int(m / LEVEL_DENOM * 4)) if inc
                  else int(m / LEVEL_DENOM * 4)),
    'Solarize': (lambda im, threshold, fill, rs: ImageOps.solarize(im, threshold),
                 lambda m, rng, inc: (256 - int(m / LEVEL_DENOM * 256)) if inc
                 else int(m / LEVEL_DENOM * 256)),
    'SolarizeAdd': (lambda im, add, fill, rs: _solarize_add(im, add),
                    lambda m, rng, inc: int(m / LEVEL_DENOM * 110)),
    'Color': (_enhance(ImageEnhance.Color), None),
    'Contrast': (_enhance(ImageEnhance.Contrast), None),
    'Brightness': (_enhance(ImageEnhance.Brightness), None),
    'Sharpness': (_enhance(ImageEnhance.Sharpness), None),
    'ShearX': (lambda im, s, fill, rs: _affine(im, (1, s, 0, 0, 1, 0), fill, rs),
               lambda m, rng, inc: _negate_half(m / LEVEL_DENOM * 0.3, rng)),
    'ShearY': (lambda im, s, fill, rs: _affine(im, (1, 0, 0, s, 1, 0), fill, rs),
               lambda m, rng, inc: _negate_half(m / LEVEL_DENOM * 0.3, rng)),
    'TranslateXRel': (lambda im, p, fill, rs: _affine(im, (1, 0, p * im.size[0], 0, 1, 0),
                                                      fill, rs),
                      lambda m, rng, inc: _negate_half(m / LEVEL_DENOM * 0.45, rng)),
    'TranslateYRel': (lambda im, p, fill, rs: _affine(im, (1, 0, 0, 0, 1, p * im.size[1]),
                                                      fill, rs),
                      lambda m, rng, inc: _negate_half(m / LEVEL_DENOM * 0.45, rng)),
}
OP_NAMES = tuple(_OPS)


def _enhance_factor(magnitude, rng, increasing):
  if increasing:  # 1 ± 0.9·m/10: identity at m = 0, stronger either way as m grows
    return max(0.1, 1.0 + _negate_half(magnitude / LEVEL_DENOM * 0.9, rng))
  return magnitude / LEVEL_DENOM * 1.8 + 0.1


def op_argument(name: str, magnitude: float, rng: np.random.Generator, increasing: bool):
  """The argument op `name` receives at `magnitude` (the sign draw, if any, from rng)."""
  level_fn = _OPS[name][1] or _enhance_factor
  return level_fn(magnitude, rng, increasing)


def apply_op(image: np.ndarray, name: str, argument, fill=(128, 128, 128),
             resample=Image.BICUBIC) -> np.ndarray:
  """One RandAugment op on uint8 [H, W, 3] with an explicit argument (see `op_argument`)."""
  op = _OPS[name][0]
  return np.asarray(op(Image.fromarray(image), argument, tuple(fill), resample))


def rand_augment(image: np.ndarray, rng: np.random.Generator, spec: RandAugmentSpec,
                 fill=(128, 128, 128), resample=Image.BICUBIC) -> np.ndarray:
  """timm's RandAugment: `num_ops` ops drawn with replacement, each applied with probability
  1/2 at a magnitude drawn around `spec.magnitude`, clipped to [0, magnitude_max].

  Args:
    image: uint8 [H, W, 3].
    fill: RGB of pixels shifted in by rotate/shear/translate (timm: the data mean ×255).
  Returns:
    uint8 [H, W, 3].
  """
  pil = Image.fromarray(image)
  fill = tuple(int(c) for c in fill)
  for index in rng.integers(len(OP_NAMES), size=spec.num_ops):
    if rng.random() >= 0.5:
      continue
    magnitude = spec.magnitude
    if spec.magnitude_std == math.inf:
      magnitude = rng.uniform(0.0, magnitude)
    elif spec.magnitude_std > 0:
      magnitude = rng.normal(magnitude, spec.magnitude_std)
    magnitude = min(max(magnitude, 0.0), spec.magnitude_max)
    name = OP_NAMES[index]
    pil = _OPS[name][0](pil, op_argument(name, magnitude, rng, spec.increasing), fill, resample)
  return np.asarray(pil)


# ----------------------------------------------------- colour and erasing ---


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """torchvision's ColorJitter(strength, strength, strength) on a PIL image: brightness,
  contrast and saturation factors uniform in [max(0, 1 − s), 1 + s], applied in random order.

  Args/Returns: uint8 [H, W, 3].
  """
  enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
  order = rng.permutation(len(enhancers))
  factors = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=len(enhancers))
  pil = Image.fromarray(image)
  for index in order:
    pil = enhancers[index](pil).enhance(factors[index])
  return np.asarray(pil)


def erase_boxes(rng: np.random.Generator, height: int, width: int, count: int = 1
                ) -> list[tuple[int, int, int, int]]:
  """(top, left, h, w) of the rectangles timm's RandomErasing picks once it has decided to
  erase: 1..count of them, each 2%..1/3 of the area / count, aspect in [0.3, 1/0.3]; a
  rectangle not found in 10 tries is skipped."""
  boxes = []
  number = int(rng.integers(1, count + 1))
  for _ in range(number):
    for _ in range(10):
      target = rng.uniform(*ERASE_AREA) * height * width / number
      aspect = math.exp(rng.uniform(*ERASE_LOG_ASPECT))
      h = int(round(math.sqrt(target * aspect)))
      w = int(round(math.sqrt(target / aspect)))
      if h < height and w < width:
        boxes.append((int(rng.integers(0, height - h + 1)),
                      int(rng.integers(0, width - w + 1)), h, w))
        break
  return boxes


def random_erasing(image: np.ndarray, rng: np.random.Generator, prob: float,
                   mode: str = 'pixel', count: int = 1) -> np.ndarray:
  """timm's RandomErasing on a normalized image; the input is not modified.

  Args:
    image: float [H, W, C], already normalized (erased values are N(0, 1) in those units).
    prob: probability of erasing at all.
    mode: 'pixel' (a normal draw per pixel and channel), 'rand' (per channel), 'const' (0).
  Returns:
    float [H, W, C], equal to `image` outside the erased rectangles.
  """
  if mode not in ERASE_MODES:
    raise ConfigError(f'augment.remode must be one of {ERASE_MODES}, got {mode!r}')
  if prob <= 0 or rng.random() >= prob:
    return image
  out = image.copy()
  for top, left, h, w in erase_boxes(rng, image.shape[0], image.shape[1], count):
    shape = {'pixel': (h, w, image.shape[2]), 'rand': (1, 1, image.shape[2]),
             'const': None}[mode]
    out[top:top + h, left:left + w] = 0.0 if shape is None else rng.standard_normal(shape)
  return out


def augment_image(image: np.ndarray, rng: np.random.Generator,
                  augment: ml_collections.ConfigDict, mean) -> np.ndarray:
  """Stage 1 for one cropped uint8 [S, S, 3] image: RandAugment, else colour jitter.

  `augment` passed `validate`; `mean` is the data's normalization mean in [0, 1] (RandAugment
  fills with it).
  """
  if augment.rand_augment:
    fill = tuple(min(255, round(255 * m)) for m in mean)
    return rand_augment(image, rng, parse_rand_augment(augment.rand_augment), fill,
                        RESAMPLE[augment.interpolation])
  if augment.color_jitter > 0:
    return color_jitter(image, rng, augment.color_jitter)
  return image


# ----------------------------------------------------------- mixup/cutmix ---


def batch_rng(seed: int, step: int, process_index: int) -> np.random.Generator:
  """The generator of `mix_batch`/`draw_mix` at a global step.

  Mixing in the workers, each process mixes its own slice with its own draw, as each GPU of
  the official code mixes its own batch: the mixed pairs depend on the process count (a
  resume on another one changes them from there on; run_identity warns). Mixing on device
  over the global batch, every process passes process_index=0 so all hold the same (keep, λ)
  for the jitted step.
  """
  return np.random.default_rng([seed, MIX_TAG, step, process_index])


def one_hot_targets(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
  """int [B] -> float32 [B, K]: 1 − ε + ε/K on the label, ε/K elsewhere."""
  off = smoothing / num_classes
  targets = np.full((len(labels), num_classes), off, np.float32)
  targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
  return targets


def cutmix_box(rng: np.random.Generator, height: int, width: int, lam: float
               ) -> tuple[int, int, int, int]:
  """(y0, y1, x0, x1) of a box of about (1 − λ) of the area centred uniformly, clipped."""
  ratio = math.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
  return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height),
          max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


def draw_mix(rng: np.random.Generator, augment: ml_collections.ConfigDict, height: int,
             width: int) -> tuple[np.ndarray, float]:
  """The random part of timm's Mixup in 'batch' mode: one draw per batch.

  With probability `mixup_prob` the batch is mixed: by cutmix with probability
  `mixup_switch_prob` when both alphas are set (else by whichever is set), λ ~ Beta(α, α);
  cutmix pastes the mirror's pixels into a box and resets λ to the kept area fraction.

  Returns:
    (keep float32 [H, W]: each example's own weight per pixel, λ its weight in the targets).
  """
  lam, use_cutmix = 1.0, False
  mixup, cutmix = augment.mixup_alpha, augment.cutmix_alpha
  if (mixup > 0 or cutmix > 0) and rng.random() < augment.mixup_prob:
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < augment.mixup_switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
  if not use_cutmix or lam == 1.0:
    return np.full((height, width), lam, np.float32), lam
  y0, y1, x0, x1 = cutmix_box(rng, height, width, lam)
  keep = np.ones((height, width), np.float32)
  keep[y0:y1, x0:x1] = 0.0
  return keep, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def apply_mix(images, targets, keep, lam):
  """Mixes each example with its mirror `images[::-1]`; numpy or jax arrays alike, so the
  arithmetic can run in the worker or inside the jitted step (keep and λ then travel with
  the batch).

  Args:
    images: float [B, H, W, C]; targets: float [B, K] (`one_hot_targets`).
    keep: float [H, W] and lam: scalar, from `draw_mix`.
  Returns:
    (images [B, H, W, C], targets [B, K]); a 0/1 `keep` (cutmix, or no mix) copies pixels
    exactly.
  """
  keep = keep[..., None]
  return (keep * images + (1 - keep) * images[::-1],
          lam * targets + (1 - lam) * targets[::-1])


def mix_batch(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
              augment: ml_collections.ConfigDict, num_classes: int,
              label_smoothing: float) -> tuple[np.ndarray, np.ndarray, float]:
  """timm's Mixup/CutMix ('batch' mode) with label smoothing folded into the targets, which
  are λ·smooth(y) + (1 − λ)·smooth(y[::-1]), smoothed even when the batch is not mixed.

  Args:
    images: float32 [B, H, W, C] (normalized).
    labels: int [B].
  Returns:
    (images float32 [B, H, W, C], targets float32 [B, K] with rows summing to 1, λ).
  """
  targets = one_hot_targets(labels, num_classes, label_smoothing)
  keep, lam = draw_mix(rng, augment, images.shape[1], images.shape[2])
  if lam == 1.0:
    return images, targets, lam
  images, targets = apply_mix(images, targets, keep, np.float32(lam))
  return images, targets, lam


# --------------------------------------------------- repeated augmentation ---


def repeated_indices(seed: int, epoch: int, num_examples: int, num_repeats: int,
                     num_replicas: int) -> np.ndarray:
  """Example indices int [num_replicas, num_examples // num_replicas]: row r is what replica r
  reads in `epoch`.

  The epoch's permutation with every index repeated `num_repeats` times in a row, wrapped to
  a multiple of num_replicas and dealt round-robin, so the copies of an example land on
  different replicas (when num_replicas >= num_repeats); each replica's share is cut to
  num_examples // num_replicas, so an epoch keeps its length and sees about 1/num_repeats of
  the distinct examples. (The official sampler also rounds the dataset size down to a
  multiple of 256 before dividing; drop-last batching makes that moot here.)
  """
  order = np.repeat(np.random.default_rng([seed, REPEAT_TAG, epoch]).permutation(num_examples),
                    num_repeats)
  total = -(-len(order) // num_replicas) * num_replicas
  order = np.concatenate([order, order[:total - len(order)]])
  return order.reshape(-1, num_replicas).T[:, :num_examples // num_replicas]


def repeated_epoch_order(seed: int, epoch: int, num_examples: int, num_repeats: int,
                         num_replicas: int, replica_batch: int) -> np.ndarray:
  """The global epoch order int [steps·num_replicas·replica_batch] whose consecutive global
  batches of num_replicas·replica_batch, split evenly along the batch axis, give replica r
  its next `replica_batch` of `repeated_indices(...)[r]`; a drop-in for the epoch
  permutation when the batch axis is sharded over num_replicas devices (cache it per epoch,
  as data.epoch_permutation is)."""
  streams = repeated_indices(seed, epoch, num_examples, num_repeats, num_replicas)
  steps = streams.shape[1] // replica_batch
  streams = streams[:, :steps * replica_batch].reshape(num_replicas, steps, replica_batch)
  return streams.transpose(1, 0, 2).reshape(-1)
