"""The evaluation preprocessing of the reference, in numpy and PIL only (no JAX).

`bhvit_jax.data` builds its pipelines on these functions and the JAX-free deploy runtime
(`bhvit_jax.deploy_runtime`) applies them to the images it is given, so an exported model sees
the pixels the evaluation tools feed the JAX model.
"""
import io

import numpy as np
from PIL import Image

# torchvision's ImageFolder list (compared lower-case).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
INTERPOLATIONS = {'nearest': Image.NEAREST, 'bilinear': Image.BILINEAR,
                  'bicubic': Image.BICUBIC, 'lanczos': Image.LANCZOS, 'box': Image.BOX,
                  'hamming': Image.HAMMING}
# S×S inputs up to this side are used unresized, as the reference does for CIFAR-sized data.
NO_RESIZE_MAX = 32


def decode_image(data: bytes, draft_size: int = 0) -> Image.Image:
  """Encoded image bytes -> RGB PIL image, converted as the reference's loader does
  (`.convert('RGB')`; EXIF orientation is not applied).

  draft_size > 0 lets a JPEG decode at a reduced scale whose sides stay >= draft_size
  (faster, other pixels: data.fast_decode).
  """
  img = Image.open(io.BytesIO(data))
  if draft_size:
    img.draft('RGB', (draft_size, draft_size))
  img.load()
  return img if img.mode == 'RGB' else img.convert('RGB')


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W] or [H, W, 1|3] -> uint8 [H, W, 3]."""
  image = np.asarray(image, dtype=np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an [H, W, 1|3] image, got shape {image.shape}')
  return image


def as_pil(image) -> Image.Image:
  return image if isinstance(image, Image.Image) else Image.fromarray(to_rgb(image))


def resample_filter(interpolation: str):
  """PIL's resampling filter of an interpolation name."""
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'unknown interpolation {interpolation!r}; expected one of '
                     f'{sorted(INTERPOLATIONS)}')
  return INTERPOLATIONS[interpolation]


def eval_transform(image, image_size: int, resize_size: int,
                   interpolation: str = 'bicubic') -> np.ndarray:
  """PIL image or uint8 [H, W, 3] -> shorter side resized to `resize_size` (the longer one
  truncated, as torchvision's Resize), centre crop uint8 [S, S, 3] (resize_size >= S).

  As the reference, S×S inputs at S <= 32 (CIFAR-sized) are used as they are: no resize, no
  crop. (The reference cannot batch other sizes there; they take the usual path.)
  """
  img = as_pil(image)
  if image_size <= NO_RESIZE_MAX and img.size == (image_size, image_size):
    return np.asarray(img)
  width, height = img.size
  if width <= height:
    size = resize_size, int(resize_size * height / width)
  else:
    size = int(resize_size * width / height), resize_size
  if size != img.size:
    img = img.resize(size, resample_filter(interpolation))
  top = int(round((size[1] - image_size) / 2))
  left = int(round((size[0] - image_size) / 2))
  return np.asarray(img.crop((left, top, left + image_size, top + image_size)))


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [..., 3] -> float32 ((x / 255) - mean) / std."""
  return ((images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))
