r"""Exports a BHViT as an IREE module or an ONNX model that runs without JAX (bhvit_jax.predict).

  python tools/export_deploy.py --config configs/demo.py --checkpoint runs/demo \
      --format iree --out demo.vmfb
  python tools/export_deploy.py --config configs/demo.py --checkpoint runs/demo \
      --format onnx --out demo.onnx
  python -m bhvit_jax.predict --artifact demo.vmfb --images digits/

--checkpoint: anything tools/evaluate.py reads (a run directory, `WORKDIR:<step>`, `.msgpack`,
`.pth`/`.pt`/`.npz`) or a bit-packed file of tools/export_packed.py. The module is the packed
inference (bhvit_jax.packed: bit-packed uint32 weights and XNOR-popcount binary layers, float
only where the model is float) lowered with `jax.export` to StableHLO and compiled by IREE's
llvm-cpu backend; the packed weights are its constants. --target: 'host' (this CPU's
features), 'x86_64' or 'aarch64' (generic CPUs of that architecture; cross-compiled). The
module's batch is fixed (--batch, default 1; the runtime pads a last partial batch): IREE 3.13
cannot legalize the `stablehlo.dynamic_reshape` that a symbolic batch lowers to.

--format onnx: the same packed network converted by jax2onnx, with the binary layers' signs
as ±1/0 float32 operands (ONNX has no popcount) unpacked in the graph from the same uint32
words, so the file keeps the bit-packed weights; any ONNX runtime runs it on any CPU. Its
batch is dynamic unless --batch is given. Beside the artifact, a JSON
sidecar `<out>.json` holds the preprocessing, class names, the checkpoint's sha256 and the
producing versions (bhvit_jax.deploy_runtime). Both files are written under temporary names
and renamed, so a failed export leaves nothing.
"""
import argparse
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

import bhvit_jax
from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import config_lib
from bhvit_jax import data as data_lib
from bhvit_jax import deploy_runtime
from bhvit_jax import model as model_lib
from bhvit_jax import packed

FORMATS = ('iree', 'onnx')
# IREE llvm-cpu flags per target.
TARGETS = {'host': ['--iree-llvmcpu-target-cpu=host'],
           'x86_64': ['--iree-llvmcpu-target-triple=x86_64-unknown-linux-gnu'],
           'aarch64': ['--iree-llvmcpu-target-triple=aarch64-unknown-linux-gnu']}
# For every target: data tiling with microkernels halves a 224² module's batch-1 latency (its
# attention's batch matmuls run ~7× faster; docs/performance.md) for ~5% more at 32².
DATA_TILING = ['--iree-opt-data-tiling', '--iree-llvmcpu-enable-ukernels=all']


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='config file (its model and data)')
  parser.add_argument('--checkpoint', required=True, help='float checkpoint or packed file')
  parser.add_argument('--format', default='iree', help=f'one of {FORMATS}')
  parser.add_argument('--target', default='host', help=f'iree: one of {sorted(TARGETS)}')
  parser.add_argument('--batch', type=int, default=None,
                      help='images per call (default: iree 1, onnx dynamic)')
  parser.add_argument('--out', required=True, help='output artifact (.vmfb, .onnx)')
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


def _import_extra(module: str, fmt: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise config_lib.UserError(f'--format {fmt} needs the [deploy] extra ({module} is not '
                               'installed)') from None


def compile_iree(model, arrays, batch: int, target: str) -> bytes:
  """IREE module of the packed eval logits for float32 `[batch, S, S, 3]` images."""
  compiler = _import_extra('iree.compiler', 'iree')
  # The arrays are closure constants: IREE folds the weight regrouping into them.
  fn = jax.jit(lambda images: packed.apply(model, arrays, images))
  shape = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)
  mlir = jax.export.export(fn)(shape).mlir_module()
  compile_with = lambda flags: compiler.compile_str(
      mlir, target_backends=['llvm-cpu'], input_type='stablehlo', extra_args=flags)
  try:
    return compile_with(DATA_TILING + TARGETS[target])
  except compiler.CompilerToolError as e:
    # IREE 3.13's data tiling fails on some matmul dispatches ("exceeded stack allocation
    # limit", e.g. the float twin's attention projection at 224², batch 16).
    error = next((l for l in str(e).splitlines() if 'error:' in l), str(e)).strip()
    logging.warning('IREE data tiling failed (%s); compiling without it', error[:300])
    return compile_with(TARGETS[target])


def convert_onnx(model, arrays, batch) -> bytes:
  """ONNX model of the packed eval logits with float ±1 products; `batch` None: dynamic."""
  jax2onnx = _import_extra('jax2onnx', 'onnx')
  # Its plugin registry logs a traceback for every optional example it cannot import.
  logging.getLogger('jax2onnx').setLevel(logging.ERROR)
  onnx = _import_extra('onnx', 'onnx')
  size = model.image_size
  # The weights enter as inputs and become the model's initializers afterwards: as closure
  # constants jax2onnx folds the unpacking and stores one byte per binary weight.
  leaves, treedef = jax.tree.flatten(arrays)
  names = [f'weights_{i}' for i in range(len(leaves))]
  apply = lambda images, *w: packed.apply(model, jax.tree.unflatten(treedef, w), images, 'float')
  proto = jax2onnx.to_onnx(apply, [(batch or 'batch', size, size, 3)] +
                           [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in leaves],
                           model_name='bhvit', input_names=['images', *names],
                           output_names=['logits'])
  graph = proto.graph
  graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(w), name)
                           for name, w in zip(names, leaves))
  images = [i for i in graph.input if i.name == 'images']
  del graph.input[:]
  graph.input.extend(images)
  del graph.value_info[:]  # optional shape annotations: a third of a small model's file
  return proto.SerializeToString()


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


WEIGHTS = {'iree': 'bit-packed uint32 constants (XNOR-popcount binary layers)',
           'onnx': 'bit-packed uint32 initializers, unpacked to ±1 float32 in the graph'}


def sidecar(config, model, spec: str, fmt: str, target: str, batch) -> dict:
  _, interpolation, resize_size = data_lib.transform_settings(config)
  mean, std = data_lib.normalization(config)
  versions = {'bhvit_jax': bhvit_jax.__version__, 'jax': jax.__version__}
  versions.update({p: importlib.metadata.version(p) for p in deploy_runtime.EXPORTERS[fmt]})
  return {'format': deploy_runtime.FORMAT, 'runtime': fmt,
          'target': target if fmt == 'iree' else 'any', 'batch': batch,
          'image_size': model.image_size, 'resize_size': resize_size,
          'interpolation': interpolation, 'mean': list(mean), 'std': list(std),
          'num_classes': model.num_classes, 'class_names': class_names(config),
          'weights': WEIGHTS[fmt],
          'checkpoint': os.path.basename(os.path.normpath(ckpt_lib.split_spec(spec)[0])),
          'checkpoint_sha256': sha256(ckpt_lib.split_spec(spec)[0]), 'versions': versions}


def export(config, spec: str, fmt: str, target: str, batch, out: str) -> dict:
  """Writes the artifact `out` and its sidecar; returns the sidecar.

  `config`: a config file or a loaded config; `batch` None: the format's default (iree 1,
  onnx dynamic).
  """
  if fmt not in FORMATS:
    raise config_lib.UserError(f'unknown --format {fmt!r}; expected one of {FORMATS}')
  if target not in TARGETS:
    raise config_lib.UserError(f'unknown --target {target!r}; expected one of {sorted(TARGETS)}')
  if batch is not None and batch < 1:
    raise config_lib.UserError(f'--batch must be at least 1, not {batch}')
  if isinstance(config, str):
    config = config_lib.load_config_file(config)
  model, arrays = load_packed(config, spec)
  if fmt == 'iree':
    batch = batch or 1
    module = compile_iree(model, arrays, batch, target)
  else:
    module = convert_onnx(model, arrays, batch)
  meta = sidecar(config, model, spec, fmt, target, batch)
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
