r"""PNG of BHViT's binarized attention for chosen blocks, heads, window and query.

  python tools/plot_attention.py --fixture ../shared/fixtures/case_public.npz \
      --image fixture:0 --blocks layerB_0,layerB_1 --heads 0,1 --query 24 --out attn.png
  python tools/plot_attention.py --config configs/demo.py --checkpoint runs/demo \
      --image mnist:3 --out attn.png
  python tools/plot_attention.py --image photo.jpg --checkpoint bhvit_tiny.pth --out attn.png

One row per (block, head): the input with the window and query marked; the softmax row P of
the query over its keys (the window's w×w tokens, then the image's global tokens after a gap);
for gsb attention the three maps of quantization decomposition T0, T1, T2
(quantizers.gsb_maps) and the quantized row α·(T0 + α2·T1 + α3·T2) with the learned α, α2, α3;
for the 3-level LSQ quantizer its integer levels instead; last, the keys that every query of
the window keeps (quantized probability ≠ 0). Variables: --fixture (its model and state),
--checkpoint (anything `checkpoint.load_any` reads; model from --config, or --variant from
`model.VARIANTS` updated by --model-json) or a random init.
"""
import sys

from absl import flags
import jax
import jax.numpy as jnp
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

from bhvit_jax import checkpoint
from bhvit_jax import cli
from bhvit_jax import data
from bhvit_jax import model as model_lib
from bhvit_jax import reference

UserError = cli.UserError


def attention_probs(model, variables, images):
  """{block: softmax probabilities `[B·nW, heads, Nq, Nk]`} of every SelfAttention."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates'])[1])
  state = apply(variables, images)
  out = {block: np.asarray(tree['attention']['attention']['attention_probs'][0])
         for block, tree in state['intermediates'].items()}
  if not out:
    raise UserError('the model has no attention blocks')
  return out


def quantized_rows(model, variables, block, probs, head):
  """[(title, `[Nq, Nk]` map)] of the quantizer's parts, and the quantized probabilities."""
  if model.input_bits != 1:
    return [], probs
  quantizer = model_lib.ATTENTION_QUANTIZERS[model_lib.attention_quantizer(model)]
  return quantizer.maps(probs, variables['params'][block]['attention']['attention'], head)


def key_layout(row, w):
  """A key row `[w·w + G·G]` -> 2-D display: w×w window keys, a gap, the G×G global keys."""
  g = int(round(np.sqrt(row.size - w * w)))
  out = np.full((max(w, g), w + 1 + g), np.nan)
  out[:w, :w] = row[:w * w].reshape(w, w)
  out[:g, w + 1:] = row[w * w:].reshape(g, g)
  return out


def _window_box(model, window, grid):
  """(top, left, size) in pixels of `window` at the block's token grid."""
  w = model.window_size
  per_row = grid // w
  cell = model.image_size / grid
  return (window // per_row) * w * cell, (window % per_row) * w * cell, w * cell


def plot(model, variables, image, blocks=None, heads=(0,), window=0, query=0, out='a.png'):
  """Writes the PNG for one image `[H, W, 3]` (normalized); returns the figure's pixel size."""
  names = sorted(b for b in variables['params'] if b.startswith('layerB_'))
  blocks = blocks or names
  unknown = [b for b in blocks if b not in names]
  if unknown:
    raise UserError(f'no attention block named {unknown}; choose from {names}')
  maps = attention_probs(model, variables, jnp.asarray(image)[None])
  rows = [(b, h) for b in blocks for h in heads]
  fig, axes = plt.subplots(len(rows), 7, figsize=(21, 3.2 * len(rows)), squeeze=False)
  shown = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
  for ax_row, (block, head) in zip(axes, rows):
    _plot_row(ax_row, model, variables, block, head, maps[block], window, query, shown)
  fig.tight_layout()
  fig.savefig(out, dpi=60)
  plt.close(fig)
  return Image.open(out).size


def _plot_row(axes, model, variables, block, head, probs, window, query, shown):
  n_win, heads, nq, _ = probs.shape
  w = model.window_size
  if not (0 <= head < heads and 0 <= window < n_win and 0 <= query < nq):
    raise UserError(f'{block}: head {head}, window {window}, query {query} out of range '
                     f'(heads {heads}, windows {n_win}, queries {nq})')
  p = probs[window, head]
  parts, quantized = quantized_rows(model, variables, block, p, head)
  grid = w * int(round(np.sqrt(n_win)))
  top, left, size = _window_box(model, window, grid)
  axes[0].imshow(shown)
  axes[0].add_patch(plt.Rectangle((left, top), size, size, fill=False, color='r', lw=2))
  if query < w * w:
    cell = size / w
    axes[0].plot(left + (query % w + 0.5) * cell, top + (query // w + 0.5) * cell, 'c*', ms=12)
  axes[0].set_title(f'{block} head {head} window {window} query {query}', fontsize=9)
  panels = [('softmax P', p)] + parts
  for ax, (title, matrix) in zip(axes[1:], panels):
    im = ax.imshow(key_layout(matrix[query], w), cmap='viridis')
    ax.set_title(title, fontsize=9)
    plt.colorbar(im, ax=ax, fraction=0.046)
  axes[-1].imshow(quantized != 0, cmap='gray_r', aspect='auto', interpolation='nearest')
  axes[-1].set_title('kept keys (rows: queries)', fontsize=9)
  axes[-1].set_xlabel('key')
  for ax in axes[1 + len(panels):-1]:
    ax.axis('off')


def _index(spec, text, size):
  if not text.isdigit() or int(text) >= size:
    raise UserError(f'--image index must be in [0, {size}) ({spec})')
  return int(text)


def load_image(spec, image_size, fixture=None):
  """`path` | `mnist:IDX` | `mnist:SPLIT:IDX` | `fixture:IDX` -> normalized `[S, S, 3]`."""
  kind, _, rest = spec.partition(':')
  if kind == 'fixture':
    if fixture is None:
      raise UserError(f'--image fixture:IDX needs --fixture ({spec})')
    return np.asarray(fixture.images[_index(spec, rest, len(fixture.images))])
  if kind == 'mnist':
    split, _, index = rest.rpartition(':')
    if split not in ('', 'train', 'test'):
      raise UserError(f"--image mnist split must be 'train' or 'test' ({spec})")
    source = data.MnistSource(split or 'test', image_size)
    pixels, _ = source[_index(spec, index, len(source))]
    return data.normalize(pixels, data.MNIST_MEAN, data.MNIST_STD)
  cli.input_path(spec, '--image (a file, mnist:IDX or fixture:IDX)')
  try:
    with Image.open(spec) as img:
      pixels = data.eval_transform(img.convert('RGB'), image_size,
                                   int(image_size / data.EVAL_CROP_RATIO))
  except OSError as e:
    raise UserError(f'--image is not a readable image: {e} ({spec})') from None
  return data.normalize(pixels, data.IMAGENET_MEAN, data.IMAGENET_STD)


def define_flags(flag_values, argv):
  cli.define_model_flags(flag_values, argv)
  for name, default, text in (
      ('fixture', '', 'reference case .npz (model, state, inputs)'),
      ('checkpoint', '', 'run directory, WORKDIR:<step>, .msgpack or .pth/.pt/.npz'),
      ('image', 'fixture:0', 'path, mnist:IDX, mnist:SPLIT:IDX or fixture:IDX'),
      ('out', 'attention.png', 'output PNG')):
    flags.DEFINE_string(name, default, text, flag_values=flag_values)
  flags.DEFINE_list('blocks', [], 'attention blocks, e.g. layerB_0 (default: all)',
                    flag_values=flag_values)
  flags.DEFINE_list('heads', ['0'], 'heads to show', flag_values=flag_values)
  flags.DEFINE_integer('window', 0, 'window index of the image (row-major)',
                       flag_values=flag_values)
  flags.DEFINE_integer('query', 0, 'query token in the window (w·w window tokens, then the '
                       'global tokens)', flag_values=flag_values)


def _model_and_variables(f):
  if f.fixture:
    fx = reference.Fixture(cli.input_path(f.fixture, '--fixture'), x64=False)
    return fx.model, fx.variables, fx
  model = model_lib.from_config(cli.model_fields(f))
  if f.checkpoint:
    return model, checkpoint.load_any(f.checkpoint, model), None
  images = jnp.zeros((1, model.image_size, model.image_size, 3))
  key = jax.random.key(0, impl='unsafe_rbg')  # threefry compiles slowly for a whole init
  return model, jax.jit(model.init)({'params': key}, images), None


def plot_attention(f, argv):
  del argv
  with cli.output_file(f.out) as tmp:
    model, variables, fixture = _model_and_variables(f)
    image = load_image(f.image, model.image_size, fixture)
    if not all(h.isdigit() for h in f.heads):
      raise UserError(f'--heads must be non-negative integers ({",".join(f.heads)})')
    size = plot(model, variables, image, f.blocks, [int(h) for h in f.heads], f.window,
                f.query, tmp)
  print(f'wrote {f.out} ({size[0]}x{size[1]} px)')


def main(argv=None):
  return cli.run(plot_attention, define_flags, argv)


if __name__ == '__main__':
  sys.exit(main())
