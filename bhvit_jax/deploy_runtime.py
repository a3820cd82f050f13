"""Runs a BHViT exported by tools/export_deploy.py with numpy, PIL and IREE's or ONNX runtime.

An artifact is a compiled IREE module (`model.vmfb`, an entry `main_b<N>` for each batch size
N) or an ONNX model (`model.onnx`, input `images`, output `logits`), both float32 images
`[N, S, S, 3]`, normalised -> float32 logits `[N, classes]`, and its JSON sidecar
`model.vmfb.json`, whose keys are:
- `format` (`FORMAT`), `runtime` ('iree' or 'onnx'), `target` ('host', 'x86_64' or
  'aarch64'; 'any' for ONNX), `batches` (the sizes N in increasing order; null: dynamic);
- `image_size`, `resize_size`, `interpolation`, `mean`, `std`: the evaluation preprocessing
  (`bhvit_jax.transforms`), so the artifact sees the pixels tools/evaluate.py feeds the model;
- `num_classes`, `class_names` (null when the data set names none), `weights` (how they are
  stored), `checkpoint`, `checkpoint_sha256`, `versions` (the producing packages),
  `popcount_layers` (null, or the binary layers whose XNOR-popcount sums an IREE module's
  `popcounts_b<N>` returns, for the largest N, in this order).

Nothing here imports JAX or Flax: the module is meant for devices that have neither. Errors
in what the user gives (an artifact, an image) raise `DeployError` with a one-line message;
it is a ValueError, as the project's `config_lib.UserError`, which needs absl.
"""
import importlib.metadata
import json
import os
import platform

import numpy as np

from bhvit_jax import transforms

FORMAT = 'bhvit-deploy-v2'
# The package that runs each runtime's artifacts, and those that write them (the sidecar
# records the exporters' versions).
RUNTIME_PACKAGES = {'iree': 'iree-base-runtime', 'onnx': 'onnxruntime'}
EXPORTERS = {'iree': ('iree-base-compiler',), 'onnx': ('onnx',)}
# Images per call of an artifact with a dynamic batch (bounds the activations' memory).
DYNAMIC_CHUNK = 32
# The machine names (platform.machine()) each target's code runs on; 'host' means the exporter's.
TARGET_MACHINES = {'x86_64': ('x86_64', 'AMD64'), 'aarch64': ('aarch64', 'arm64')}


class DeployError(ValueError):
  """A bad artifact or input image: reported as one `error:` line."""


def sidecar_path(artifact: str) -> str:
  return artifact + '.json'


def _minor(version: str) -> str:
  return '.'.join(version.split('.')[:2])


def read_sidecar(artifact: str) -> dict:
  """The checked sidecar of `artifact`."""
  path = sidecar_path(artifact)
  if not os.path.isfile(artifact):
    raise DeployError(f'artifact not found: {artifact}')
  try:
    with open(path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise DeployError(f'{artifact} has no sidecar {path} (export writes both)') from None
  except (OSError, ValueError) as e:
    raise DeployError(f'{path} is not a readable sidecar: {e}') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    found = meta.get('format') if isinstance(meta, dict) else None
    raise DeployError(f'{artifact} comes from another version of bhvit_jax (format {found!r}, '
                      f'this runtime reads {FORMAT!r}); export it again')
  if meta.get('runtime') not in RUNTIME_PACKAGES:
    raise DeployError(f"{artifact} needs an unknown runtime {meta.get('runtime')!r}; this "
                      f'one runs {sorted(RUNTIME_PACKAGES)}')
  return meta


def _check_runtime(artifact: str, meta: dict):
  """The runtime package is installed; IREE modules are also not portable across IREE
  releases or CPU architectures (ONNX models are)."""
  package = RUNTIME_PACKAGES[meta['runtime']]
  try:
    installed = importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    raise DeployError(f'{artifact} needs the {package} package (the [runtime] extra)') from None
  if meta['runtime'] != 'iree':
    return
  compiled = meta.get('versions', {}).get(EXPORTERS['iree'][0], '')
  if _minor(installed) != _minor(compiled):
    raise DeployError(f'{artifact} was compiled by IREE {compiled} but {package} '
                      f'{installed} is installed; install {_minor(compiled)}.* or export again')
  machines = TARGET_MACHINES.get(meta['target'])
  if machines and platform.machine() not in machines:
    raise DeployError(f"{artifact} is compiled for {meta['target']}, not for this "
                      f'{platform.machine()} machine')


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_iree_module(artifact: str, threads=None):
  """An IREE module on the CPU's task driver; its functions are attributes."""
  import iree.runtime as ireert  # pylint: disable=g-import-not-at-top  (checked by the caller)
  with open(artifact, 'rb') as f:
    data = f.read()
  # One thread: the synchronous driver runs the dispatches on the calling thread, without the
  # task system's hand-off to a worker (0.14–0.18 ms less per call at 32²; docs/performance.md).
  driver = 'local-sync' if threads == 1 else 'local-task'
  if threads is not None:
    # A process-wide flag, read when the process first creates the task driver.
    ireert.flags.parse_flags(f'--task_topology_max_group_count={threads}')
  try:
    module = ireert.load_vm_flatbuffer(data, driver=driver)
  except RuntimeError as e:
    raise DeployError(f'{artifact} is not a loadable IREE module: {_first_line(e)}') from None
  return module


def _load_iree(artifact: str, threads):
  """`images -> logits` of an IREE module: the function of the images' batch size."""
  module = load_iree_module(artifact, threads)
  # A copy: the host view aliases a buffer that the next call reuses.
  return lambda images: np.array(getattr(module, f'main_b{len(images)}')(images).to_host())


def _load_onnx(artifact: str, threads):
  """`images -> logits` of an ONNX model in an onnxruntime CPU session."""
  # pylint: disable=g-import-not-at-top  (checked by the caller)
  import onnxruntime
  from onnxruntime.capi import onnxruntime_pybind11_state as errors
  # pylint: enable=g-import-not-at-top
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # errors only
  if threads is not None:
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
  try:
    # ConvMulFusion folds a binary conv's per-output scale into its ±1 weights, so the sums
    # are no longer exact integers and a sign downstream can flip (5% of the logits at 224²).
    session = onnxruntime.InferenceSession(artifact, options,
                                           providers=['CPUExecutionProvider'],
                                           disabled_optimizers=['ConvMulFusion'])
  except (errors.InvalidProtobuf, errors.InvalidGraph, errors.Fail) as e:
    raise DeployError(f'{artifact} is not a loadable ONNX model: {_first_line(e)}') from None
  return lambda images: session.run(['logits'], {'images': images})[0]


class Model:
  """A loaded artifact: `predict_logits(images)` on preprocessed images, `preprocess(image)`.

  `threads`: the runtime's worker threads (None: its default, one per core; IREE runs a single
  thread's work on the calling thread).
  """

  def __init__(self, artifact: str, threads=None):
    self.meta = read_sidecar(artifact)
    _check_runtime(artifact, self.meta)
    load = _load_iree if self.meta['runtime'] == 'iree' else _load_onnx
    self._run = load(artifact, threads)
    self.batches = self.meta['batches']

  def preprocess(self, image) -> np.ndarray:
    """PIL image or uint8 `[H, W, 3]` -> normalised float32 `[S, S, 3]`."""
    m = self.meta
    pixels = transforms.eval_transform(image, m['image_size'], m['resize_size'],
                                       m['interpolation'])
    return transforms.normalize(pixels, m['mean'], m['std'])

  def predict_logits(self, images: np.ndarray) -> np.ndarray:
    """float32 `[N, S, S, 3]` (preprocessed) -> float32 logits `[N, classes]`.

    Fixed batch sizes: each call takes the smallest size that holds the remaining images (else
    the largest); a last call's padding (zeros) is dropped.
    """
    images = np.asarray(images, np.float32)
    out = []
    start = 0
    while start < len(images):
      remaining = len(images) - start
      if self.batches:
        size = next((b for b in self.batches if b >= remaining), self.batches[-1])
      else:
        size = min(remaining, DYNAMIC_CHUNK)
      chunk = images[start:start + size]
      count = len(chunk)
      if count < size:
        chunk = np.pad(chunk, [(0, size - count)] + [(0, 0)] * (chunk.ndim - 1))
      out.append(self._run(chunk)[:count])
      start += count
    return np.concatenate(out) if out else np.zeros((0, self.meta['num_classes']), np.float32)


def load_image(path: str):
  """RGB PIL image of the file at `path`."""
  try:
    with open(path, 'rb') as f:
      return transforms.decode_image(f.read())
  except (OSError, ValueError, SyntaxError) as e:
    raise DeployError(f'{path} is not a readable image: {e}') from None


def image_files(paths) -> list:
  """Files given, with each directory replaced by its image files (sorted, recursive)."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                     for name in names if name.lower().endswith(transforms.IMAGE_EXTENSIONS))
      if not found:
        raise DeployError(f'{path} holds no image files ({", ".join(transforms.IMAGE_EXTENSIONS)})')
      files += found
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise DeployError(f'image not found: {path}')
  return files

