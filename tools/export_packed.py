r"""Exports a BHViT to the bit-packed deployable format (bhvit_jax.packed) and checks it.

  python tools/export_packed.py --fixture /work/shared/fixtures/case_public.npz --out fx.bhvitpk
  python tools/export_packed.py --config configs/bhvit_tiny.py --checkpoint tiny.pth --out t.pk
  python tools/export_packed.py --preset small --out small.pk --benchmark_batch 16

Variables come from --checkpoint (a PyTorch .pth/.pt, an orbax run directory, WORKDIR:<step> or
WORKDIR:best; --ema takes the run's EMA weights), from the
case fixture (--fixture, its model and inputs), or a random init. Prints the file size next to
the float32 checkpoint and the theoretical size (binarized/8 + full precision·4 bytes), the
relative error of the packed eval logits against the float model's, and optionally eval
images/s of both. The last line is a JSON object of these numbers.
"""
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from bhvit_jax import checkpoint
from bhvit_jax import model as model_lib
from bhvit_jax import packed
from bhvit_jax import reference

PRESETS = {'tiny': {'depths': (2, 2, 6, 2)}, 'small': {'depths': (3, 4, 8, 4)}}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file with a `model` sub-config')
_PRESET = flags.DEFINE_enum('preset', 'tiny', list(PRESETS), 'model without --config/--fixture')
_MODEL_JSON = flags.DEFINE_string('model-json', '', 'JSON of BHViT fields updating the preset')
_CHECKPOINT = flags.DEFINE_string('checkpoint', '', '.pth/.pt file, orbax run directory, '
                                  'WORKDIR:<step> or WORKDIR:best')
_EMA = flags.DEFINE_bool('ema', False, "export the run's EMA weights (config.ema_decay > 0)")
_FIXTURE = flags.DEFINE_string('fixture', '', 'reference case .npz: its model, state and input')
_OUT = flags.DEFINE_string('out', None, 'packed output file', required=True)
_FP16 = flags.DEFINE_bool('fp16', False, 'store the full-precision parts as float16')
_BATCH = flags.DEFINE_integer('benchmark_batch', 0, 'measure eval images/s at this batch (0: off)')
_SEED = flags.DEFINE_integer('seed', 0, 'random init / random images seed')


def build_model():
  if _CONFIG.value is not None:
    return model_lib.from_config(_CONFIG.value.model)
  fields = dict(PRESETS[_PRESET.value])
  fields.update(json.loads(_MODEL_JSON.value or '{}'))
  return model_lib.from_config(fields)


def load_variables(model):
  """(model, variables, images) from the flags."""
  if _FIXTURE.value:
    fx = reference.Fixture(_FIXTURE.value, x64=False)
    return fx.model, fx.variables, fx.images
  key = jax.random.PRNGKey(_SEED.value)
  images = jax.random.normal(key, (2, model.image_size, model.image_size, 3), jnp.float32)
  if not _CHECKPOINT.value:
    variables = jax.jit(lambda k: model.init({'params': k}, images[:1]))(key)
  else:
    variables = checkpoint.load_any(_CHECKPOINT.value, model, ema=_EMA.value)
  return model, variables, images


def images_per_second(fn, images, repeats=3):
  jax.block_until_ready(fn(images))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(images))
  return repeats * images.shape[0] / (time.perf_counter() - start)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  model, variables, images = load_variables(build_model())
  tree = packed.export(model, variables, np.float16 if _FP16.value else np.float32)
  size = packed.save(tree, _OUT.value)
  _, arrays = packed.load(_OUT.value)
  # Weights are jit arguments: as closure constants XLA folds them and rounds differently.
  packed_jit = jax.jit(lambda a, x: packed.apply(model, a, x))
  float_jit = jax.jit(lambda v, x: model.apply(v, x, train=False))
  packed_fn = lambda x: packed_jit(arrays, x)
  float_fn = lambda x: float_jit(variables, x)
  report = {'packed_bytes': size, 'float_bytes': packed.float_checkpoint_bytes(variables),
            'theoretical_bytes': packed.theoretical_bytes(model),
            'logits_rel': reference.rel_error(packed_fn(images), float_fn(images))}
  report['packed_over_theoretical'] = size / report['theoretical_bytes']
  if _BATCH.value:
    batch = jax.random.normal(jax.random.PRNGKey(1),
                              (_BATCH.value, model.image_size, model.image_size, 3))
    report['packed_images_per_s'] = images_per_second(packed_fn, batch)
    report['float_images_per_s'] = images_per_second(float_fn, batch)
  for key, value in report.items():
    print(f'{key:24s} {value:,.6g}')
  print(json.dumps(report))


if __name__ == '__main__':
  app.run(main)
