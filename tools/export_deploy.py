r"""Exports a BHViT as a compiled IREE module that runs without JAX (bhvit_jax.predict).

  python tools/export_deploy.py --config configs/demo.py --checkpoint runs/demo \
      --format iree --out demo.vmfb
  python -m bhvit_jax.predict --artifact demo.vmfb --images digits/

--checkpoint: anything tools/evaluate.py reads (a run directory, `WORKDIR:<step>`, `.msgpack`,
`.pth`/`.pt`/`.npz`) or a bit-packed file of tools/export_packed.py. The module is the packed
inference (bhvit_jax.packed: bit-packed uint32 weights and XNOR-popcount binary layers, float
only where the model is float) lowered with `jax.export` to StableHLO and compiled by IREE's
llvm-cpu backend; the packed weights are its constants. --target: 'host' (this CPU's
features), 'x86_64' or 'aarch64' (generic CPUs of that architecture; cross-compiled). The
batch is fixed (--batch); the runtime pads a last partial batch. Beside the module, a JSON
sidecar `<out>.json` holds the preprocessing, class names, the checkpoint's sha256 and the
producing versions (bhvit_jax.deploy_runtime). Both files are written under temporary names
and renamed, so a failed export leaves nothing.
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import sys

import jax
import jax.numpy as jnp

import bhvit_jax
from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import config_lib
from bhvit_jax import data as data_lib
from bhvit_jax import deploy_runtime
from bhvit_jax import model as model_lib
from bhvit_jax import packed

FORMATS = ('iree',)
# IREE llvm-cpu flags per target.
TARGETS = {'host': ['--iree-llvmcpu-target-cpu=host'],
           'x86_64': ['--iree-llvmcpu-target-triple=x86_64-unknown-linux-gnu'],
           'aarch64': ['--iree-llvmcpu-target-triple=aarch64-unknown-linux-gnu']}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='config file (its model and data)')
  parser.add_argument('--checkpoint', required=True, help='float checkpoint or packed file')
  parser.add_argument('--format', default='iree', help=f'one of {FORMATS}')
  parser.add_argument('--target', default='host', help=f'one of {sorted(TARGETS)}')
  parser.add_argument('--batch', type=int, default=1, help='images per call of the module')
  parser.add_argument('--out', required=True, help='output module (.vmfb)')
  return parser.parse_args(argv)


def load_packed(config, spec: str):
  """(model, packed arrays) of a float checkpoint or a packed file of `config`'s model."""
  model = model_lib.build(config.model, config.compute_dtype)
  if not ckpt_lib.is_packed_file(spec):
    return model, packed.arrays(packed.export(model, ckpt_lib.load_any(spec, model)))
  stored, arrays = packed.load(spec)
  differ = [f for f in model_lib.MODEL_FIELDS
            if f != 'dtype' and getattr(stored, f) != getattr(model, f)]
  if differ:
    raise config_lib.UserError(f'packed file {spec} holds another model than the config: '
                               f'{", ".join(f"{f}={getattr(stored, f)!r}" for f in differ)}')
  return stored, arrays


def lower(model, arrays, batch: int) -> str:
  """StableHLO text of the packed eval logits for float32 `[batch, S, S, 3]` images."""
  # The arrays are closure constants: IREE folds the weight regrouping into them.
  fn = jax.jit(lambda images: packed.apply(model, arrays, images))
  shape = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)
  return jax.export.export(fn)(shape).mlir_module()


def compile_iree(mlir: str, target: str) -> bytes:
  import iree.compiler  # pylint: disable=g-import-not-at-top  (the [deploy] extra)
  return iree.compiler.compile_str(mlir, target_backends=['llvm-cpu'], input_type='stablehlo',
                                   extra_args=TARGETS[target])


def sha256(path: str) -> str:
  """Of a file, or of a directory's relative file names and contents in sorted order."""
  digest = hashlib.sha256()
  if os.path.isfile(path):
    files = [(path, '')]
  else:
    files = sorted((os.path.join(root, n), os.path.relpath(os.path.join(root, n), path))
                   for root, _, names in os.walk(path) for n in names)
  for full, relative in files:
    digest.update(relative.encode())
    with open(full, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
  return digest.hexdigest()


def class_names(config):
  """Names of the classes in label order, where the data set names them."""
  kind = config.data.name.partition(':')[0]
  if kind == 'mnist':
    return [str(i) for i in range(10)]
  train_dir = os.path.join(config.data.get('data_dir') or '', config.data.train_split)
  if kind == 'folder' and os.path.isdir(train_dir):
    return data_lib.list_classes(train_dir)
  return None


def sidecar(config, model, spec: str, target: str, batch: int) -> dict:
  _, interpolation, resize_size = data_lib.transform_settings(config)
  mean, std = data_lib.normalization(config)
  versions = {'bhvit_jax': bhvit_jax.__version__, 'jax': jax.__version__,
              deploy_runtime.COMPILER_PACKAGE:
                  importlib.metadata.version(deploy_runtime.COMPILER_PACKAGE)}
  return {'format': deploy_runtime.FORMAT, 'runtime': 'iree', 'target': target, 'batch': batch,
          'image_size': model.image_size, 'resize_size': resize_size,
          'interpolation': interpolation, 'mean': list(mean), 'std': list(std),
          'num_classes': model.num_classes, 'class_names': class_names(config),
          'weights': 'bit-packed uint32 constants (XNOR-popcount binary layers)',
          'checkpoint': os.path.basename(os.path.normpath(ckpt_lib.split_spec(spec)[0])),
          'checkpoint_sha256': sha256(ckpt_lib.split_spec(spec)[0]), 'versions': versions}


def export(config_file: str, spec: str, fmt: str, target: str, batch: int, out: str) -> dict:
  """Writes the module `out` and its sidecar; returns the sidecar."""
  if fmt not in FORMATS:
    raise config_lib.UserError(f'unknown --format {fmt!r}; expected one of {FORMATS}')
  if target not in TARGETS:
    raise config_lib.UserError(f'unknown --target {target!r}; expected one of {sorted(TARGETS)}')
  if batch < 1:
    raise config_lib.UserError(f'--batch must be at least 1, not {batch}')
  config = config_lib.load_config_file(config_file)
  model, arrays = load_packed(config, spec)
  meta = sidecar(config, model, spec, target, batch)
  module = compile_iree(lower(model, arrays, batch), target)
  outputs = {out: module, deploy_runtime.sidecar_path(out): json.dumps(meta, indent=2).encode()}
  try:
    for path, data in outputs.items():
      with open(path + '.tmp', 'wb') as f:
        f.write(data)
    for path in outputs:
      os.replace(path + '.tmp', path)
  finally:
    for path in outputs:
      if os.path.exists(path + '.tmp'):
        os.remove(path + '.tmp')
  return meta


def main(argv=None):
  args = parse_args(argv)
  try:
    export(args.config, args.checkpoint, args.format, args.target, args.batch, args.out)
  except (ValueError, FileNotFoundError) as e:
    config_lib.fail(str(e))
  print(f'wrote {args.out} ({os.path.getsize(args.out):,} bytes) and '
        f'{deploy_runtime.sidecar_path(args.out)}')


if __name__ == '__main__':
  main()
