r"""Exports a BHViT to the bit-packed deployable format (bhvit_jax.packed) and checks it.

  python tools/export_packed.py --fixture ../shared/fixtures/case_public.npz --out fx.bhvitpk
  python tools/export_packed.py --config configs/bhvit_tiny.py --checkpoint tiny.pth --out t.pk
  python tools/export_packed.py --variant small --out small.pk --benchmark_batch 16

Variables come from --checkpoint (anything `checkpoint.load_any` reads: a run directory,
WORKDIR:<step>, WORKDIR:best, .msgpack, .pth/.pt/.npz; --ema takes the run's EMA weights), from
the case fixture (--fixture, its model and inputs), or a random init. The model is --config's,
else --variant (a size of `model.VARIANTS`) updated by --model-json. Prints the file size next
to the float32 checkpoint and the theoretical size (binarized/8 + full precision·4 bytes), the
relative error of the packed eval logits against the float model's, and optionally eval
images/s of both. The last line is a JSON object of these numbers.
"""
import json
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bhvit_jax import checkpoint
from bhvit_jax import cli
from bhvit_jax import model as model_lib
from bhvit_jax import packed
from bhvit_jax import reference


def define_flags(flag_values, argv):
  cli.define_model_flags(flag_values, argv)
  for name, default, text in (
      ('checkpoint', '', 'run directory, WORKDIR:<step>, WORKDIR:best, .msgpack or '
                         '.pth/.pt/.npz'),
      ('fixture', '', 'reference case .npz: its model, state and input'),
      ('out', None, 'packed output file')):
    flags.DEFINE_string(name, default, text, flag_values=flag_values)
  flags.mark_flag_as_required('out', flag_values=flag_values)
  flags.DEFINE_bool('ema', False, "export the run's EMA weights (config.ema_decay > 0)",
                    flag_values=flag_values)
  flags.DEFINE_bool('fp16', False, 'store the full-precision parts as float16',
                    flag_values=flag_values)
  flags.DEFINE_integer('benchmark_batch', 0, 'measure eval images/s at this batch (0: off)',
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_integer('seed', 0, 'random init / random images seed', flag_values=flag_values)


def load_variables(f):
  """(model, variables, images) from the flags."""
  if f.fixture:
    fx = reference.Fixture(cli.input_path(f.fixture, '--fixture'), x64=False)
    return fx.model, fx.variables, fx.images
  model = model_lib.from_config(cli.model_fields(f))
  key = jax.random.PRNGKey(f.seed)
  images = jax.random.normal(key, (2, model.image_size, model.image_size, 3), jnp.float32)
  if f.checkpoint:
    return model, checkpoint.load_any(f.checkpoint, model, ema=f.ema), images
  return model, model_lib.init_variables(model, key), images


def images_per_second(fn, images, repeats=3):
  jax.block_until_ready(fn(images))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(images))
  return repeats * images.shape[0] / (time.perf_counter() - start)


def export(f, argv):
  del argv
  with cli.output_file(f.out) as tmp:
    model, variables, images = load_variables(f)
    tree = packed.export(model, variables, np.float16 if f.fp16 else np.float32)
    size = packed.save(tree, tmp)
    _, arrays = packed.load(tmp)
  # Weights are jit arguments: as closure constants XLA folds them and rounds differently.
  packed_jit = jax.jit(lambda a, x: packed.apply(model, a, x))
  float_jit = jax.jit(lambda v, x: model.apply(v, x, train=False))
  packed_fn = lambda x: packed_jit(arrays, x)
  float_fn = lambda x: float_jit(variables, x)
  report = {'packed_bytes': size, 'float_bytes': packed.float_checkpoint_bytes(variables),
            'theoretical_bytes': packed.theoretical_bytes(model),
            'logits_rel': reference.rel_error(packed_fn(images), float_fn(images))}
  report['packed_over_theoretical'] = size / report['theoretical_bytes']
  if f.benchmark_batch:
    batch = jax.random.normal(jax.random.PRNGKey(1),
                              (f.benchmark_batch, model.image_size, model.image_size, 3))
    report['packed_images_per_s'] = images_per_second(packed_fn, batch)
    report['float_images_per_s'] = images_per_second(float_fn, batch)
  for key, value in report.items():
    print(f'{key:24s} {value:,.6g}')
  print(json.dumps(report))


def main(argv=None):
  return cli.run(export, define_flags, argv)


if __name__ == '__main__':
  sys.exit(main())
