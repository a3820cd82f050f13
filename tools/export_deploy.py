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
features), 'x86_64' or 'aarch64' (generic CPUs of that architecture; cross-compiled). IREE
3.13 cannot legalize the `stablehlo.dynamic_reshape` that a symbolic batch lowers to, so the
module has one function `main_b<N>` per batch size of --batch (a comma list, default 1), all
sharing the weight constants (IREE stores identical constants once); the runtime calls the
smallest one that takes the remaining images and pads that call. Each size adds its code: at
the demo's geometry 1,042,094 bytes for `1` (1.08x the packed file), 1,280,214 for `1,16`. `export(...,
popcounts=True)` adds `popcounts_b<N>`, the int32 XNOR-popcount sums of every binary layer, to
check a module's integer arithmetic exactly against JAX's (tests/test_deploy.py does).

--format onnx: the same packed network lowered by bhvit_jax.onnx_export (the project's own
jaxpr -> ONNX converter, opset 18), with the binary layers' signs as ±1/0 float32 operands
(ONNX has no popcount) unpacked in the graph from the same uint32 words, so the file keeps
the bit-packed weights; any ONNX runtime runs it on any CPU. Its batch is dynamic unless
--batch gives one size. Beside the artifact, a JSON
sidecar `<out>.json` holds the preprocessing, class names, the checkpoint's sha256 and the
producing versions (bhvit_jax.deploy_runtime). Both files are written under temporary names
and renamed, so a failed export leaves nothing.
"""
import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bhvit_jax
from bhvit_jax import checkpoint as ckpt_lib
from bhvit_jax import cli
from bhvit_jax import config_lib
from bhvit_jax import data as data_lib
from bhvit_jax import deploy_runtime
from bhvit_jax import model as model_lib
from bhvit_jax import packed

FORMATS = ('iree', 'onnx')
IREE_BATCHES = (1,)
# IREE llvm-cpu flags per target.
TARGETS = {'host': ['--iree-llvmcpu-target-cpu=host'],
           'x86_64': ['--iree-llvmcpu-target-triple=x86_64-unknown-linux-gnu'],
           'aarch64': ['--iree-llvmcpu-target-triple=aarch64-unknown-linux-gnu']}
# For every target: data tiling with microkernels halves a 224² module's batch-1 latency (its
# attention's batch matmuls run ~7× faster; docs/performance.md) for ~5% more at 32².
DATA_TILING = ['--iree-opt-data-tiling', '--iree-llvmcpu-enable-ukernels=all']


def parse_args(argv):
  parser = cli.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='config file (its model and data)')
  parser.add_argument('--checkpoint', required=True, help='float checkpoint or packed file')
  parser.add_argument('--format', default='iree', help=f'one of {FORMATS}')
  parser.add_argument('--target', default='host', help=f'iree: one of {sorted(TARGETS)}')
  parser.add_argument('--batch', default=None,
                      help='images per call, a comma list for iree (default: iree '
                      f'{",".join(map(str, IREE_BATCHES))}, onnx dynamic)')
  parser.add_argument('--out', required=True, help='output artifact (.vmfb, .onnx)')
  return parser.parse_args(argv)


def parse_batches(value) -> tuple:
  """--batch as sorted distinct sizes: an int, ints or a comma list; () for None."""
  if value is None:
    return ()
  items = value.split(',') if isinstance(value, str) else np.atleast_1d(value).tolist()
  try:
    batches = sorted({int(b) for b in items})
  except ValueError:
    raise config_lib.UserError(f'--batch must be positive integers separated by commas, not '
                               f'{value!r}') from None
  if not batches or batches[0] < 1:
    raise config_lib.UserError(f'--batch sizes must be at least 1 ({value!r})')
  return tuple(batches)


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


def compile_iree(model, arrays, batches, target: str, popcounts: bool = False) -> bytes:
  """IREE module of the packed eval logits: `main_b<N>` for float32 `[N, S, S, 3]` images,
  one per N in `batches`.

  `popcounts`: also `popcounts_b<N>` for the largest N, the int32 XNOR-popcount sums of the
  binary layers (`packed.apply(..., popcounts=True)`, its dict's values in key order): the
  integer part of the module, for checking it exactly against JAX.
  """
  compiler = _import_extra('iree.compiler', 'iree')
  # The arrays are closure constants: IREE folds the weight regrouping into them.
  logits = jax.jit(lambda images: packed.apply(model, arrays, images))
  shape = lambda n: jax.ShapeDtypeStruct((n, model.image_size, model.image_size, 3),
                                         jnp.float32)
  functions = {f'main_b{n}': jax.export.export(logits)(shape(n)) for n in batches}
  if popcounts:
    sums = jax.jit(lambda images: jax.tree.leaves(
        packed.apply(model, arrays, images, popcounts=True)[1]))
    functions[f'popcounts_b{batches[-1]}'] = jax.export.export(sums)(shape(batches[-1]))
  mlir = _merge_modules(compiler.ir, functions)
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


def _merge_modules(ir, exported: dict) -> str:
  """One StableHLO module whose public function `name` is `exported[name]`'s `main`.

  Each module's private functions get the prefix `<name>.` (jax names them per module, so
  they collide across modules).
  """
  with ir.Context(), ir.Location.unknown():
    merged = ir.Module.create()
    for name, fn in exported.items():
      module = ir.Module.parse(fn.mlir_module())
      for op in module.body.operations:
        old = ir.StringAttr(op.attributes['sym_name']).value
        new = name if old == 'main' else f'{name}.{old}'
        ir.SymbolTable.replace_all_symbol_uses(old, new, module.operation)
        ir.SymbolTable.set_symbol_name(op, new)
      for op in list(module.body.operations):
        merged.body.append(op)
    return merged.operation.get_asm(enable_debug_info=False)


def popcount_layers(model, arrays) -> list:
  """The layers whose sums `popcounts_b<N>` returns, in its order (`jax.tree.leaves` of a
  dict: sorted keys)."""
  shape = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  return sorted(jax.eval_shape(lambda x: packed.apply(model, arrays, x, popcounts=True),
                               shape)[1])


def convert_onnx(model, arrays, batch) -> bytes:
  """ONNX model of the packed eval logits with float ±1 products; `batch` None: dynamic."""
  _import_extra('onnx', 'onnx')
  from bhvit_jax import onnx_export  # pylint: disable=g-import-not-at-top  (needs onnx)
  size = model.image_size
  # The weights are arguments, not closure constants, so the graph unpacks the uint32 words
  # instead of storing the traced ±1 signs.
  leaves, treedef = jax.tree.flatten(arrays)
  apply = lambda images, *w: packed.apply(model, jax.tree.unflatten(treedef, w), images, 'float')
  proto = onnx_export.to_onnx(apply, [((None, size, size, 3), np.float32)], leaves,
                              input_names=['images'], output_names=['logits'], batch=batch,
                              model_name='bhvit')
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


def sidecar(config, model, spec: str, fmt: str, target: str, batches, layers) -> dict:
  _, interpolation, resize_size = data_lib.transform_settings(config)
  mean, std = data_lib.normalization(config)
  versions = {'bhvit_jax': bhvit_jax.__version__, 'jax': jax.__version__}
  versions.update({p: importlib.metadata.version(p) for p in deploy_runtime.EXPORTERS[fmt]})
  return {'format': deploy_runtime.FORMAT, 'runtime': fmt,
          'target': target if fmt == 'iree' else 'any', 'batches': list(batches) or None,
          'image_size': model.image_size, 'resize_size': resize_size,
          'interpolation': interpolation, 'mean': list(mean), 'std': list(std),
          'num_classes': model.num_classes, 'class_names': class_names(config),
          'weights': WEIGHTS[fmt],
          'checkpoint': os.path.basename(os.path.normpath(ckpt_lib.split_spec(spec)[0])),
          'checkpoint_sha256': sha256(ckpt_lib.split_spec(spec)[0]), 'versions': versions,
          'popcount_layers': layers}


def export(config, spec: str, fmt: str, target: str, batch, out: str,
           popcounts: bool = False) -> dict:
  """Writes the artifact `out` and its sidecar; returns the sidecar.

  `config`: a config file or a loaded config; `batch`: a size, sizes or a comma list (iree: one
  function each), None: the format's default (iree `IREE_BATCHES`, onnx dynamic);
  `popcounts`: iree only, see `compile_iree` (the sidecar lists the layers in order).
  """
  if fmt not in FORMATS:
    raise config_lib.UserError(f'unknown --format {fmt!r}; expected one of {FORMATS}')
  if target not in TARGETS:
    raise config_lib.UserError(f'unknown --target {target!r}; expected one of {sorted(TARGETS)}')
  cli.check_output(out)
  batches = parse_batches(batch)
  if fmt == 'onnx' and len(batches) > 1:
    raise config_lib.UserError(f'--format onnx takes one --batch size or none (dynamic), not '
                               f'{batch!r}')
  if popcounts and fmt != 'iree':
    raise config_lib.UserError(f'popcounts are exported by --format iree only, not {fmt!r}')
  if isinstance(config, str):
    config = config_lib.load_config_file(config)
  model, arrays = load_packed(config, spec)
  layers = None
  if fmt == 'iree':
    batches = batches or IREE_BATCHES
    module = compile_iree(model, arrays, batches, target, popcounts)
    layers = popcount_layers(model, arrays) if popcounts else None
  else:
    module = convert_onnx(model, arrays, batches[0] if batches else None)
  meta = sidecar(config, model, spec, fmt, target, batches, layers)
  outputs = {out: module, deploy_runtime.sidecar_path(out): json.dumps(meta, indent=2).encode()}
  with contextlib.ExitStack() as stack:
    temporary = {path: stack.enter_context(cli.output_file(path)) for path in outputs}
    for path, data in outputs.items():
      with open(temporary[path], 'wb') as f:
        f.write(data)
  return meta


def run(argv):
  args = parse_args(argv[1:])
  export(args.config, args.checkpoint, args.format, args.target, args.batch, args.out)
  print(f'wrote {args.out} ({os.path.getsize(args.out):,} bytes) and '
        f'{deploy_runtime.sidecar_path(args.out)}')


def main(argv=None):
  return cli.run(run, argv=argv)


if __name__ == '__main__':
  sys.exit(main())
